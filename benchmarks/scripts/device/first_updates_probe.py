"""Where a reused process's first updates go, trial after trial: the paper DT's fine-tuning trainer built
TRIALS times in one process (``begin_trial`` between, as a reused Ray actor does), each trainer's first
update (compilation, graph recording) and its next 19 timed apart, the memory still allocated when each
trial begins (what earlier trials left) and each trial's peak, and dynamo's own compile-time table.
Issue 20 item 4: under CUDA graphs a trial's first 20 updates took 10.7 s (`bench scale`, 2026-12-03e); with
the compiled loss shared under graphs a reused trial's first update took ~0.05 s (2026-12-03f).

python benchmarks/scripts/device/first_updates_probe.py OUT.json [reduce-overhead|default] [TRIALS] [share|own]
    [TREE_TRIALS]

``share``/``own`` sets HARNESS_SHARE_GRAPHS (under graphs); TREE_TRIALS overrides
``process_cache.GRAPH_TREE_TRIALS`` (how many trials keep one set of graph trees), to see what the step costs
with more recordings kept.
"""
import json
import os
import sys
import time

import torch

from agents.bench import finetune_trainer
from agents.track import RLSettings, model_config
from harness import process_cache
from harness.process_cache import begin_trial
from harness.randomness import seeded
from harness.training import pick_device, synchronize

out, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "reduce-overhead"
trials = int(sys.argv[3]) if len(sys.argv) > 3 else 3
if len(sys.argv) > 4:
    os.environ["HARNESS_SHARE_GRAPHS"] = {"share": "1", "own": "0"}[sys.argv[4]]
if len(sys.argv) > 5:
    process_cache.GRAPH_TREE_TRIALS = int(sys.argv[5])
ts = RLSettings(compile=True, compile_mode=mode)
cfg, device = model_config(ts), pick_device("auto")
cuda = device.type == "cuda"
rows = []
for i in range(trials):
    begin_trial()
    at_start = torch.cuda.memory_allocated(device) / 2**20 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer = finetune_trainer(cfg, ts, 128, 40, True, device, mode=mode)
    built = time.perf_counter()
    with seeded(i):
        trainer.step()
        synchronize(device)
        first = time.perf_counter()
        for _ in range(19):
            trainer.step()
        synchronize(device)
        twenty = time.perf_counter()
        while trainer.step():
            pass
        stats = trainer.finish()
    rows.append({"trial": i, "build_s": built - t0, "first_update_s": first - built,
                 "updates_2_20_s": twenty - first, "updates_21_40_s": time.perf_counter() - twenty,
                 "compiled_step": trainer.compiled_step, "final_loss": stats.final_loss,
                 "graphs_compiled": stats.graphs_compiled, "allocated_at_start_mib": round(at_start, 1),
                 "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else 0.0})
    print(rows[-1], flush=True)
    del trainer
    with open(out, "w") as f:  # after every trainer: a cut call keeps what ran
        json.dump({"command": " ".join(sys.argv), "mode": mode, "torch": torch.__version__,
                   "graph_tree_trials": process_cache.GRAPH_TREE_TRIALS,
                   "device_name": torch.cuda.get_device_name(device) if cuda else str(device),
                   "rows": rows, "dynamo_compile_times": torch._dynamo.utils.compile_times(repr="str")}, f,
                  indent=1)
print(torch._dynamo.utils.compile_times(repr="str"))

"""Where a reused process's first updates go, trial after trial: the paper DT's fine-tuning trainer built
TRIALS times in one process (``begin_trial`` between, as a reused Ray actor does), each trainer's first
update (compilation, graph recording) and its next 19 timed apart, and dynamo's own compile-time table.
Issue 20 item 4: under CUDA graphs a trial's first 20 updates took 10.7 s (`bench scale`, 2026-12-03e).

python benchmarks/scripts/device/first_updates_probe.py OUT.json [reduce-overhead|default] [TRIALS]
"""
import json
import sys
import time

import torch

from agents.bench import finetune_trainer
from agents.track import RLSettings, model_config
from harness.process_cache import begin_trial
from harness.randomness import seeded
from harness.training import pick_device, synchronize

out, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "reduce-overhead"
trials = int(sys.argv[3]) if len(sys.argv) > 3 else 3
ts = RLSettings(compile=True, compile_mode=mode)
cfg, device = model_config(ts), pick_device("auto")
rows = []
for i in range(trials):
    begin_trial()
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
        synchronize(device)
    rows.append({"trial": i, "build_s": built - t0, "first_update_s": first - built,
                 "updates_2_20_s": twenty - first, "updates_21_40_s": time.perf_counter() - twenty,
                 "compiled_step": trainer.compiled_step})
    print(rows[-1], flush=True)
    del trainer
    with open(out, "w") as f:  # after every trainer: a cut call keeps what ran
        json.dump({"command": " ".join(sys.argv), "mode": mode, "torch": torch.__version__,
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                   "rows": rows, "dynamo_compile_times": torch._dynamo.utils.compile_times(repr="str")}, f,
                  indent=1)
print(torch._dynamo.utils.compile_times(repr="str"))

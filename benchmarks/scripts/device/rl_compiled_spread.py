"""bench rl's compiled training figures alone (no eager runs, no rollouts), ROUNDS alternations instead of
three: the spread of harness/plain between runs on one host, in torch's default mode or under CUDA graphs.

python benchmarks/scripts/device/rl_compiled_spread.py OUT.json [default|reduce-overhead] [ROUNDS]
"""
import json
import sys

import numpy as np
import torch

from agents.bench import _harness_rate, _plain_rate
from agents.track import RLSettings, model_config
from harness.training import pick_device

out, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "default"
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
ts = RLSettings(compile=True, compile_mode=mode, bench_steps=200)
cfg, device, batch, steps = model_config(ts), pick_device("auto"), 128, 200
runs = []
for i in range(rounds):
    runs.append((_harness_rate(cfg, ts, batch, steps, True, device),
                 _harness_rate(cfg, ts, batch, steps, True, device, fixed_batch=True),
                 _plain_rate(cfg, ts, batch, steps, True, device)))
    print(f"round {i}: harness {runs[-1][0]:.1f}, fixed batch {runs[-1][1]:.1f}, plain {runs[-1][2]:.1f}, "
          f"ratio {runs[-1][0] / runs[-1][2]:.3f}", flush=True)
    with open(out, "w") as f:  # after every round: a cut call keeps what ran
        json.dump({"command": " ".join(sys.argv), "mode": mode, "torch": torch.__version__,
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                   "runs": runs,
                   "ratios": [h / p for h, _, p in runs],
                   "median_ratio": float(np.median([h / p for h, _, p in runs]))}, f, indent=1)

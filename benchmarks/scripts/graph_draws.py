"""Device check (CUDA only): under compile_mode reduce-overhead, where each training step replays a captured
CUDA graph, GLoRA's per-step form draws and dropout's masks still differ from step to step, as they do eagerly
and under torch's default mode (the generator's offset advances at each replay). Prints, per mode, how many
distinct forms and dropped-element counts 10 steps gave; writes every step's to the JSON file named. From the
project root on a GPU machine: ``PYTHONPATH=. python benchmarks/scripts/graph_draws.py draws.json``."""
import json
import sys

import torch
from torch import nn
import torch.nn.functional as F
from harness.methods.glora import GLoRALinear
from harness.training import compiled_loss

out = {}
for mode in ("eager", "default", "reduce-overhead"):
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = GLoRALinear(nn.Linear(64, 64).cuda(), (8, 4)).cuda().train()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(32, 64, device="cuda")

    def loss(batch):
        y = F.dropout(layer(batch), 0.5, training=True)
        return torch.stack([y.square().mean(), (y == 0).float().sum()])

    fn = loss if mode == "eager" else compiled_loss(loss, mode)
    codes, zeros, masks = [], [], []
    for step in range(12):
        v = fn(x)
        v[0].backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        codes.append(tuple(layer._last.tolist()))
        zeros.append(float(v[1]))
    out[mode] = {"distinct_forms": len(set(codes[2:])), "forms": [list(c) for c in codes],
                 "dropped_counts": zeros, "distinct_dropped_counts": len(set(zeros[2:]))}
    print(mode, out[mode]["distinct_forms"], out[mode]["distinct_dropped_counts"], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)

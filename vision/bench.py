"""``python -m harness bench vision``: training images/s for full fine-tuning and LoRA through the harness's
training loop, and the share of step time spent producing batches. GPU: ViT-B/16 at 224, batch 256 (bf16
autocast). CPU: a tiny ViT at 32 px, batch 32 (said so in the output: CPU numbers are not comparable)."""

from __future__ import annotations

from typing import Any

import torch

from harness.methods import MethodContext, get_method
from harness.randomness import seeded
from harness.training import LoopConfig, pick_device, train
from vision.backbones import build_backbone
from vision.images import Split
from vision.train import DeviceSplit, batches, classification_loss


def bench(ts) -> dict[str, Any]:
    """Speed figures for the backbone of the track settings ``ts`` (a ``vision.track.VisionSettings``)."""
    device = pick_device(ts.device)
    gpu = device.type == "cuda"
    if not gpu and "backbone" not in ts.model_fields_set:
        ts = ts.model_copy(update={"backbone": "vit_tiny_patch16_224", "img_size": 32,
                                   "model_kwargs": {"patch_size": 8, "depth": 4}})
    bs = 256 if gpu else 32
    steps = ts.bench_steps or (30 if gpu else 8)
    n = bs * 4
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g))
    out: dict[str, Any] = {"device": str(device), "batch_size": bs, "steps": steps,
                           "note": "" if gpu else "CPU: tiny ViT at 32 px, batch 32; not comparable to GPU figures"}
    for mname in ("full", "lora"):
        method = get_method(mname)
        with seeded(0):
            bb = build_backbone(ts.backbone, 10, "random", ts.img_size, 0.0, ts.model_kwargs,
                                tuple(ts.adapter_targets))
            model = method.wrap(bb.model.to(device), bb.site, method.default_settings(),
                                MethodContext(device=device)).to(device)
            data = DeviceSplit.make(split, bb.img_size, bb.mean, bb.std, device)
            order = batches(len(data), bs, torch.Generator().manual_seed(0))
            loop = LoopConfig(steps=3, lr=1e-4, compile=ts.compile, report_every=0, time_data=True)
            train(model, classification_loss, lambda: data.batch(next(order)), loop, device)  # warm-up, not timed
            loop.steps = steps
            stats = train(model, classification_loss, lambda: data.batch(next(order)), loop, device)
        out[mname] = {"backbone": ts.backbone, "img_size": bb.img_size,
                      "images_per_s": round(steps * bs / stats.wall_s, 1),
                      "ms_per_step": round(1000 * stats.wall_s / steps, 2), "data_share": round(stats.data_share, 4)}
    out["lora_step_vs_full"] = round(out["lora"]["ms_per_step"] / out["full"]["ms_per_step"], 3)
    return out

"""``python -m harness bench methods``: per-method training step time and peak memory on one model.

All methods are timed in one process on the same model, batch and device, and reported as ratios to
full fine-tuning (and to LoRA), so the figures compare within the run. On a GPU the default is ViT-B/16
at batch 64 with bf16 autocast; on a CPU a small ViT, and the absolute times mean little there.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from harness.methods import AdapterSite, MethodContext, get_method, method_names
from harness.randomness import seeded
from harness.training import LoopConfig, Trainer, synchronize
from harness.validation import Bool, Int, validate

VIT_SITE = AdapterSite(targets=("qkv", "attn.proj", "fc1", "fc2"), head=("head",))


class BenchSettings(BaseModel):
    """``--set`` keys of ``bench methods``; None takes the device's default (ViT-B/16 bs64 on a GPU)."""

    model_config = ConfigDict(extra="forbid")
    backbone: str | None = None
    img_size: Int | None = Field(None, ge=8)
    batch_size: Int | None = Field(None, ge=1)
    steps: Int | None = Field(None, ge=1)
    warmup: Int | None = Field(None, ge=0)
    methods: list[str] | None = None
    compile: Bool = False  # torch.compile forward and loss, as trials with `compile: true` do (CUDA only)
    fast: Bool = True  # the harness's fast adapter forwards (fast_peft); false: peft's own, for comparison


def _defaults(cuda: bool) -> dict[str, Any]:
    if cuda:
        return {"backbone": "vit_base_patch16_224", "img_size": 224, "batch_size": 64, "steps": 20, "warmup": 5,
                "methods": method_names()}
    return {"backbone": "vit_tiny_patch16_224", "img_size": 64, "batch_size": 16, "steps": 5, "warmup": 2,
            "methods": method_names()}


def _make_model(backbone: str, img_size: int, device: torch.device) -> nn.Module:
    import timm

    with seeded(0):
        return timm.create_model(backbone, pretrained=False, num_classes=10, img_size=img_size).to(device)


def _bank(cfg: dict[str, Any], device: torch.device, folder: Path) -> list[str]:
    """Three random LoRA adapters of the same base, as EigenLoRA's bank."""
    lora = get_method("lora")
    paths = []
    for i in range(3):
        model = _make_model(cfg["backbone"], cfg["img_size"], device)
        settings = lora.resolve_settings({"r": 4})
        wrapped = lora.wrap(model, VIT_SITE, settings, MethodContext(device=device))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator(device=p.device).manual_seed(i))
        lora.save(wrapped, VIT_SITE, settings, folder / f"bank{i}")
        paths.append(str(folder / f"bank{i}"))
    return paths


def bench_methods(overrides: dict[str, Any]) -> dict[str, Any]:
    """Time each method's training step; return per-method ms/step, peak memory and ratios."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = validate(BenchSettings, overrides, "bench methods", "bench setting").model_dump(exclude_none=True)
    cfg = {**_defaults(device.type == "cuda"), **given}
    for name in cfg["methods"]:
        get_method(name)  # an unknown name fails here, listing the valid ones
    x = torch.randn(cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"], device=device)
    y = torch.randint(0, 10, (cfg["batch_size"],), device=device)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bank = _bank(cfg, device, Path(tmp)) if "eigenlora" in cfg["methods"] else []
        for name in cfg["methods"]:
            try:
                rows[name] = _time_method(name, cfg, x, y, device, bank)
            except Exception as e:  # one method's failure must not hide the others' figures
                rows[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[bench] {name}: {rows[name]}", file=sys.stderr, flush=True)
    for ref in ("full", "lora"):
        base = rows.get(ref, {}).get("ms_per_step")
        if base:
            for r in rows.values():
                if "ms_per_step" in r:
                    r[f"time_vs_{ref}"] = round(r["ms_per_step"] / base, 3)
                    if r.get("peak_mb") and rows[ref].get("peak_mb"):
                        r[f"memory_vs_{ref}"] = round(r["peak_mb"] / rows[ref]["peak_mb"], 3)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "config": cfg,
            "methods": rows}


def _time_method(name: str, cfg: dict[str, Any], x, y, device, bank) -> dict[str, Any]:
    """Step time through the harness's training loop (the same one trials use), after ``warmup`` untimed steps."""
    from harness.finetune import MethodHooks

    method = get_method(name)
    if cfg["compile"]:
        # every method compiles the same loss function anew: past dynamo's recompile limit a process
        # would silently run the later methods eager
        torch._dynamo.reset()
    model = _make_model(cfg["backbone"], cfg["img_size"], device)
    settings = method.resolve_settings({})
    ctx = MethodContext(total_steps=cfg["steps"] + cfg["warmup"], device=device, adapter_bank=bank,
                        init_batches=lambda: [(x, y)] * 4, forward_fn=lambda m, b: m(b[0]),
                        evaluate=lambda m: 0.0)
    model = method.wrap(model, VIT_SITE, settings, ctx).to(device)
    if not cfg["fast"]:
        from harness.methods import fast_peft

        fast_peft.disable(model)
    loop = LoopConfig(steps=cfg["warmup"] + cfg["steps"], lr=1e-4, report_every=0, compile=cfg["compile"])
    trainer = Trainer(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), lambda: (x, y), loop, device,
                      MethodHooks(method, ctx))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg["warmup"]):
        trainer.step()
    synchronize(device)
    start = time.perf_counter()
    while trainer.step():
        pass
    synchronize(device)
    ms = (time.perf_counter() - start) * 1000 / cfg["steps"]
    own, head = method.count(model, VIT_SITE)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"ms_per_step": round(ms, 2), "images_per_s": round(cfg["batch_size"] * 1000 / ms, 1),
            "peak_mb": round(peak, 1) if peak else None, "trainable_params": own, "head_params": head}

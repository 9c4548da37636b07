"""``python -m harness bench methods``: per-method training step time and peak memory on one model.

All methods are timed in one process on the same model, batch and device, and reported as ratios to
full fine-tuning (and to LoRA), so the figures compare within the run. Two models (``--set model=...``):

- ``vit`` (default): on a GPU ViT-B/16 at batch 64 with bf16 autocast, the four block Linears adapted;
  on a CPU a small ViT, and the absolute times mean little there.
- ``dt``: the paper's Decision Transformer (4 layers, width 512, 50 steps of context) at batch 128 on
  windows sampled on the device from random episodes of the real shape (left-padded where a window runs
  past an episode's end, as in trials), every Linear of the blocks adapted; ``tiny=true`` (the default on
  a CPU) a 2-layer width-32 DT, so a test can run it.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from harness.errors import ConfigError
from harness.finetune import MethodHooks
from harness.methods import AdapterSite, MethodContext, get_method, method_names
from harness.methods import low_rank
from harness.trial import resolve_point
from harness.randomness import seeded
from harness.training import LoopConfig, Trainer, compiled_loss, synchronize
from harness.validation import Bool, Int, validate

VIT_SITE = AdapterSite(targets=("qkv", "attn.proj", "fc1", "fc2"), head=("head",), feedforward=("mlp.fc2",))


class BenchSettings(BaseModel):
    """``--set`` keys of ``bench methods``; None takes the device's default (ViT-B/16 bs64 on a GPU)."""

    model_config = ConfigDict(extra="forbid")
    model: Literal["vit", "dt"] = "vit"
    tiny: Bool | None = None  # dt: a 2-layer width-32 DT (default on a CPU); vit: use `backbone`
    backbone: str | None = None
    img_size: Int | None = Field(None, ge=8)
    batch_size: Int | None = Field(None, ge=1)
    steps: Int | None = Field(None, ge=1)
    warmup: Int | None = Field(None, ge=0)
    methods: list[str] | None = None
    compile: Bool = False  # torch.compile forward and loss, as trials with `compile: true` do (CUDA only)
    fast: Bool = True  # the harness's fast adapter forwards (fast_peft); false: peft's own, for comparison
    # torch.compile mode of the compiled forward and loss (needs compile=true): None the trainer's own
    # (inductor's default); "reduce-overhead" replays it as CUDA graphs, which tells whether a method's
    # extra cost is kernel launches rather than device work
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] | None = None
    # pad adapter ranks to a multiple of this on CUDA (harness.methods.low_rank.RANK_ALIGN, 0 by default:
    # never); 8 measures the padding against the default
    rank_align: Int | None = Field(None, ge=0)
    # after the timed steps, `profile_steps` more with the device synchronised between the phases of a
    # step (forward+loss, the method's extra loss, backward, optimiser, the method's on_step), reporting
    # ms per phase and the kernels (CUDA) or top-level aten ops (CPU) each phase launches per step
    profile: Bool = False
    profile_steps: Int = Field(5, ge=1)


def _defaults(cuda: bool, model: str) -> dict[str, Any]:
    common = {"steps": 20, "warmup": 5} if cuda else {"steps": 5, "warmup": 2}
    if model == "dt":
        # a paper-DT step is ~10 ms on an H200: 20 timed steps left differences of 50% between methods
        # that run the same kernels (LoRA against EVA), so the GPU default times ten times as many
        timed = {"steps": 200, "warmup": 20} if cuda else common
        return {**timed, "batch_size": 128 if cuda else 8, "tiny": not cuda, "methods": method_names()}
    if cuda:
        # 20 timed steps of ViT-B (about 0.5 s) read LoRA at 1.05 to 1.34 of full fine-tuning across runs
        # of the same code (BENCHMARKS.md, issue 21): five times as many
        return {"steps": 100, "warmup": 10, "backbone": "vit_base_patch16_224", "img_size": 224, "batch_size": 64,
                "methods": method_names()}
    return {**common, "backbone": "vit_tiny_patch16_224", "img_size": 64, "batch_size": 16, "methods": method_names()}


class _Workload:
    """What a timed step needs of one model: a fresh copy, its adapter site, a batch and the loss."""

    def __init__(self, cfg: dict[str, Any], device: torch.device):
        self.cfg, self.device = cfg, device
        n = cfg["batch_size"]
        if cfg["model"] == "dt":
            from agents.bench import random_episodes  # heavy: agents.bench imports metaworld
            from agents.data import WindowSampler  # heavy: agents.data imports metaworld
            # heavy: agents.dt imports metaworld
            from agents.dt import SITE, DTConfig, batch_loss, forward_batch, layer_tokens

            self.dt_cfg = (DTConfig(n_layer=2, n_head=2, n_embd=32, context=6) if cfg["tiny"] else DTConfig())
            self.site = SITE
            self.batch = WindowSampler(random_episodes(64, self.dt_cfg), self.dt_cfg.context, seed=0,
                                       device=device).sample(n)
            self.loss: Callable[[nn.Module, Any], torch.Tensor] = batch_loss
            self.forward_fn, self.layer_inputs_fn = forward_batch, layer_tokens
            self.unit = "samples_per_s"
        else:
            self.site = VIT_SITE
            x = torch.randn(n, 3, cfg["img_size"], cfg["img_size"], device=device)
            y = torch.randint(0, 10, (n,), device=device)
            self.batch = (x, y)
            self.loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
            self.forward_fn, self.layer_inputs_fn = (lambda m, b: m(b[0])), None
            self.unit = "images_per_s"

    def model(self) -> nn.Module:
        with seeded(0):
            if self.cfg["model"] == "dt":
                from agents.dt import DecisionTransformer  # heavy: agents.dt imports metaworld

                return DecisionTransformer(self.dt_cfg).to(self.device)
            import timm

            return timm.create_model(self.cfg["backbone"], pretrained=False, num_classes=10,
                                     img_size=self.cfg["img_size"]).to(self.device)


def _bank(work: _Workload, folder: Path) -> list[str]:
    """Three random LoRA adapters of the same base, as EigenLoRA's bank."""
    lora = get_method("lora")
    paths = []
    for i in range(3):
        settings = resolve_point(lora, {"r": 4})
        wrapped = lora.wrap(work.model(), work.site, settings, MethodContext(device=work.device))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator(device=p.device).manual_seed(i))
        lora.save(wrapped, work.site, settings, folder / f"bank{i}")
        paths.append(str(folder / f"bank{i}"))
    return paths


def bench_methods(overrides: dict[str, Any]) -> dict[str, Any]:
    """Time each method's training step; return per-method ms/step, peak memory and ratios."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = validate(BenchSettings, overrides, "bench methods", "bench setting").model_dump(exclude_none=True)
    if given["model"] == "dt" and ("backbone" in given or "img_size" in given):
        raise ConfigError("bench methods: 'backbone' and 'img_size' are ViT settings; with model=dt use "
                          "'tiny' (true: a 2-layer width-32 DT; false: the paper's DT) and 'batch_size'")
    cfg = {**_defaults(device.type == "cuda", given["model"]), **given}
    if given.get("compile_mode") and not cfg["compile"]:
        raise ConfigError(f"bench methods: 'compile_mode'={given['compile_mode']!r} needs compile=true")
    for name in cfg["methods"]:
        get_method(name)  # an unknown name fails here, listing the valid ones
    work = _Workload(cfg, device)
    rows: dict[str, Any] = {}
    align = low_rank.RANK_ALIGN
    if cfg.get("rank_align") is not None:
        low_rank.RANK_ALIGN = cfg["rank_align"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bank = _bank(work, Path(tmp)) if "eigenlora" in cfg["methods"] else []
            for name in cfg["methods"]:
                try:
                    rows[name] = _time_method(name, cfg, work, bank)
                except Exception as e:  # one method's failure must not hide the others' figures
                    rows[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[bench] {name}: {rows[name]}", file=sys.stderr, flush=True)
    finally:
        low_rank.RANK_ALIGN = align
    cfg["rank_align"] = low_rank.RANK_ALIGN if cfg.get("rank_align") is None else cfg["rank_align"]
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


def _time_method(name: str, cfg: dict[str, Any], work: _Workload, bank) -> dict[str, Any]:
    """Step time through the harness's training loop (the same one trials use), after ``warmup`` untimed steps."""
    device = work.device
    method = get_method(name)
    if cfg["compile"]:
        # every method compiles the same loss function anew: past dynamo's recompile limit a process
        # would silently run the later methods eager
        torch._dynamo.reset()
    settings = method.default_settings()
    batch = work.batch
    extra = cfg["profile_steps"] if cfg["profile"] else 0
    ctx = MethodContext(total_steps=cfg["steps"] + cfg["warmup"] + extra, device=device, adapter_bank=bank,
                        init_batches=lambda: [batch] * 4, forward_fn=work.forward_fn,
                        layer_inputs_fn=work.layer_inputs_fn, validate=lambda m: 0.0)
    model = method.wrap(work.model(), work.site, settings, ctx).to(device)
    if not cfg["fast"]:
        from harness.methods import fast_peft  # heavy: harness.methods.fast_peft imports peft

        fast_peft.disable(model)
    loop = LoopConfig(steps=cfg["warmup"] + extra + cfg["steps"], lr=1e-4, report_every=0, compile=cfg["compile"])
    hooks = MethodHooks(method, ctx)
    trainer = Trainer(model, work.loss, lambda: batch, loop, device, hooks)
    if cfg["compile"] and cfg.get("compile_mode") and device.type == "cuda":
        trainer.compute_loss = compiled_loss(trainer._loss, cfg["compile_mode"])
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg["warmup"]):
        trainer.step()
    # the profiled steps come before the timed ones, so that a method's schedule (AdaLoRA's budget phase)
    # is profiled where most of a trial's steps are, not in its final phase
    phases = profile_phases(trainer, hooks, batch, extra) if extra else None
    synchronize(device)
    start = time.perf_counter()
    while trainer.step():
        pass
    synchronize(device)
    ms = (time.perf_counter() - start) * 1000 / cfg["steps"]
    own, head = method.count(model, work.site)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    row = {"ms_per_step": round(ms, 2), work.unit: round(cfg["batch_size"] * 1000 / ms, 1),
           "peak_mb": round(peak, 1) if peak else None, "trainable_params": own, "head_params": head}
    if phases is not None:
        row["phases"] = phases
    return row


PHASES = ("forward", "extra_loss", "backward", "optimizer", "on_step")


def profile_phases(trainer: Trainer, hooks: MethodHooks, batch: Any, steps: int) -> dict[str, Any]:
    """Where one training step goes, per phase (:data:`PHASES`): ms per step, with the device synchronised
    at every phase boundary (so a phase's figure is its own host and device time, and the phases sum to
    more than an unsynchronised step), and the kernels (CUDA) or top-level aten calls (CPU) that a step
    launches in each phase, from ``torch.profiler`` over the last of the ``steps`` steps.

    The steps are the trainer's next ``steps`` (its compiled loss, optimiser and the method's hooks, in its
    order, with the trainer's step numbers for the method's ``on_step`` schedule), and count as done.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    model, device = trainer.model, trainer.device
    cuda = device.type == "cuda"
    seconds = dict.fromkeys(PHASES, 0.0)

    def one(step: int, mark: Callable[[str], Any]) -> None:
        tick = time.perf_counter()

        def done(name: str) -> None:
            nonlocal tick
            synchronize(device)
            now = time.perf_counter()
            seconds[name] += now - tick
            tick = now

        with mark("forward"):
            loss = trainer.compute_loss(batch)
            done("forward")
        with mark("extra_loss"):
            reg = hooks.extra_loss(model)
            if reg is not None:
                loss = loss + reg
            done("extra_loss")
        with mark("backward"):
            loss.backward()
            done("backward")
        with mark("optimizer"):
            trainer.optimizer.step()
            done("optimizer")
        with mark("on_step"):
            hooks.on_step(model, step)
            done("on_step")
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step_index = step + 1

    model.train()
    synchronize(device)
    for _ in range(steps - 1):
        one(trainer.step_index, lambda _name: contextlib.nullcontext())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        one(trainer.step_index, record_function)
    spans = {e.name: (e.time_range.start, e.time_range.end) for e in prof.events() if e.name in PHASES}
    launches = dict.fromkeys(PHASES, 0)
    for e in prof.events():
        if cuda:
            counted = e.device_type == torch.autograd.DeviceType.CUDA
        else:  # an aten call not made by another aten call: one dispatch from Python or autograd
            counted = e.name.startswith("aten::") and not (e.cpu_parent is not None
                                                           and e.cpu_parent.name.startswith("aten::"))
        if counted:
            for name, (start, end) in spans.items():
                if start <= e.time_range.start <= end:
                    launches[name] += 1
                    break
    return {"ms": {k: round(v * 1000 / steps, 3) for k, v in seconds.items()},
            "kernels" if cuda else "aten_calls": launches}

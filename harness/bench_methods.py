"""``python -m harness bench methods``: per-method training step time and peak memory on one model.

All methods are timed in one process on the same model, batch and device, and reported as ratios to
full fine-tuning (and to LoRA), so the figures compare within the run. Two models (``--set model=...``):

- ``vit`` (default): on a GPU ViT-B/16 at batch 64 with bf16 autocast, the four block Linears adapted;
  on a CPU a small ViT, and the absolute times mean little there.
- ``dt``: the paper's Decision Transformer (4 layers, width 512, 50 steps of context) at batch 128 on
  windows sampled on the device from random episodes of the real shape (left-padded where a window runs
  past an episode's end, as in trials), every Linear of the blocks adapted; ``tiny=true`` (the default on
  a CPU) a 2-layer width-32 DT, so a test can run it.

Timing (issue 21): every method's workload is built, compiled and warmed up first, all of them kept alive;
then ``rounds`` rounds run, in each of which every method takes its share of the ``steps`` timed steps in
turn (the order rotated by one method per round). A method's ``ms_per_step`` is its median over rounds, with
the spread (``ms_per_step_min``/``_max``); ``time_vs_full`` is the median over rounds of the ratio to full
fine-tuning's time in the same round, so clock and thermal drift between minutes cancel, where timing each
method in one block let two methods that run the same kernels read 1.18 and 1.38 of full in one run.
Peak memory (CUDA) is each method's as if it ran alone: what was allocated before any method (the batch),
plus the bytes its model, optimiser state and caches hold, plus the most its steps allocated above what
was allocated when they began (warm-up and every round), the other methods' live models left out.
With ``compile=true`` each method's step is its own dynamo frame, compiled once; a graph break, an eager
fallback or a recompilation inside the rounds gives that method an error row instead of a figure.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from harness.errors import ConfigError
from harness.finetune import MethodHooks
from harness.methods import AdapterSite, MethodContext, get_method, method_names
from harness.methods import eva_init, grouped_operands, low_rank
from harness.trial import resolve_point
from harness.randomness import seeded
from harness.training import (LoopConfig, Trainer, check_inductor_options, compiled_loss, own_frame,
                              synchronize)
from harness.validation import Bool, CompileMode, Int, validate

VIT_SITE = AdapterSite(targets=("qkv", "attn.proj", "fc1", "fc2"), head=("head",), feedforward=("mlp.fc2",))


class BenchSettings(BaseModel):
    """``--set`` keys of ``bench methods``; None takes the device's default (ViT-B/16 bs64 on a GPU)."""

    model_config = ConfigDict(extra="forbid")
    model: Literal["vit", "dt"] = "vit"
    tiny: Bool | None = None  # dt: a 2-layer width-32 DT (default on a CPU); vit: use `backbone`
    # dt: agents.dt.DTConfig fields over the paper DT's (or tiny's), e.g. {"residual_dtype": "bfloat16"} or
    # {"dropout": 0.0}: what a numerics choice saves in the update
    dt: dict[str, Any] | None = None
    backbone: str | None = None
    img_size: Int | None = Field(None, ge=8)
    batch_size: Int | None = Field(None, ge=1)
    steps: Int | None = Field(None, ge=1)
    warmup: Int | None = Field(None, ge=0)
    # the timed steps are split into this many rounds, every method taking its share in turn in each round
    # (at most `steps`; the GPU default 5, the CPU's 1)
    rounds: Int | None = Field(None, ge=1)
    methods: list[str] | None = None
    compile: Bool = False  # torch.compile forward and loss, as trials with `compile: true` do (CUDA only)
    fast: Bool = True  # the harness's fast adapter forwards (fast_peft); false: peft's own, for comparison
    # torch.compile mode of the compiled forward and loss (needs compile=true): None the trainer's own
    # (inductor's default); "reduce-overhead" replays it as CUDA graphs, which tells whether a method's
    # extra cost is kernel launches rather than device work
    compile_mode: CompileMode | None = None
    # pad adapter ranks to a multiple of this on CUDA (harness.methods.low_rank.RANK_ALIGN, 0 by default:
    # never); 8 measures the padding against the default
    rank_align: Int | None = Field(None, ge=0)
    # VeRA's update merged into the weight (true), applied to the activations (false), or where its rank
    # makes the merge cheaper by FLOPs (None: harness.methods.fast_peft.VERA_MERGE's default rule)
    vera_merge: Bool | None = None
    # eager forwards of the own methods (NoLA, EigenLoRA, GLoRA) prepare same-shape layers' operands in one
    # batched product per kind (harness.methods.grouped_operands.GROUPED_EAGER, true by default); false: each
    # layer its own, for an A/B of the host time it saves
    grouped: Bool | None = None
    # RandLoRA's scaled bases in plain autograd ops ("plain", the default) or through peft's UniqueBaseGrad
    # ("peft"; harness.methods.fast_peft.PLAIN_RANDLORA_SCALES)
    randlora_scales: Literal["plain", "peft"] | None = None
    # eager low-rank forwards add their product into the base output in place and keep frozen weights'
    # bf16 casts between steps (true, harness.methods.low_rank.EAGER_IN_PLACE's default); false: the plain
    # sum with autocast's per-step casts, for an A/B
    eager_in_place: Bool | None = None
    # torch.set_float32_matmul_precision for the run: "high" lets fp32 matmuls use TF32 tensor cores. Under
    # bf16 autocast the only fp32 matmuls are the merged forms' weight-sized products (RandLoRA, VeRA where
    # it merges), which an H200 runs about 15x slower than bf16 without TF32; measures what TF32 would win
    matmul_precision: Literal["highest", "high"] | None = None
    # how EVA's initialisation finds target layers that share their input: the harness's key of the values'
    # bytes ("fast", the default) or peft's hash of every value as a Python float ("peft"); the rows'
    # wrap_s tells them apart (harness.methods.eva_init)
    eva_input_key: Literal["fast", "peft"] | None = None
    # after the timed steps, `profile_steps` more with the device synchronised between the phases of a
    # step (forward+loss, the method's extra loss, backward, optimiser, the method's on_step), reporting
    # ms per phase and the kernels (CUDA) or top-level aten ops (CPU) each phase launches per step
    profile: Bool = False
    profile_steps: Int = Field(5, ge=1)
    # how many kernels (or aten calls) the profile lists by time; the kinds' sums count them all
    profile_top: Int = Field(12, ge=1)
    # inductor settings for the run, by their dotted names in torch._inductor.config (e.g.
    # {"triton.mix_order_reduction": false}): measures a code-generation choice before trials adopt it
    inductor: dict[str, Any] | None = None
    # scaled_dot_product_attention's backends, most preferred first (flash, cudnn, efficient, math): which
    # kernel a model's attention gets when several could serve it
    sdpa_backends: list[Literal["flash", "cudnn", "efficient", "math"]] | None = Field(None, min_length=1)


_SDPA = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


@contextlib.contextmanager
def kernel_choices(inductor: dict[str, Any] | None, sdpa_backends: list[str] | None):
    """A context in which torch.compile generates code under ``inductor``'s settings and attention picks
    among ``sdpa_backends`` (:data:`_SDPA`'s names) in that order; ``inductor`` as checked by
    :func:`check_inductor_options`."""
    with contextlib.ExitStack() as stack:
        if inductor:
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(inductor))
        if sdpa_backends:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([getattr(SDPBackend, _SDPA[b]) for b in sdpa_backends],
                                            set_priority=True))
        yield


def _defaults(cuda: bool, model: str) -> dict[str, Any]:
    common = {"steps": 20, "warmup": 5, "rounds": 5} if cuda else {"steps": 5, "warmup": 2, "rounds": 1}
    if model == "dt":
        # a paper-DT step is ~10 ms on an H200: 20 timed steps left differences of 50% between methods
        # that run the same kernels (LoRA against EVA), so the GPU default times ten times as many
        timed = {**common, "steps": 200, "warmup": 20} if cuda else common
        return {**timed, "batch_size": 128 if cuda else 8, "tiny": not cuda, "methods": method_names()}
    if cuda:
        # 20 timed steps of ViT-B (about 0.5 s) read LoRA at 1.05 to 1.34 of full fine-tuning across runs
        # of the same code (BENCHMARKS.md, issue 21): five times as many
        return {**common, "steps": 100, "warmup": 10, "backbone": "vit_base_patch16_224", "img_size": 224,
                "batch_size": 64, "methods": method_names()}
    return {**common, "backbone": "vit_tiny_patch16_224", "img_size": 64, "batch_size": 16, "methods": method_names()}


def dt_config(cfg: dict[str, Any]):
    """The DT ``bench methods`` times: the paper's (or with ``tiny`` a 2-layer width-32 one), with ``dt``'s
    fields over it; an unknown field or a bad value is a :class:`ConfigError` naming the valid ones."""
    from dataclasses import fields, replace

    from agents.dt import DTConfig  # heavy: agents.dt imports metaworld

    base = DTConfig(n_layer=2, n_head=2, n_embd=32, context=6) if cfg.get("tiny") else DTConfig()
    given = cfg.get("dt") or {}
    known = [f.name for f in fields(DTConfig)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"bench methods: 'dt' has no field {', '.join(map(repr, unknown))}; the DT's fields are "
                          + ", ".join(known))
    try:
        return replace(base, **given)
    except (TypeError, ValueError) as e:  # a value of the wrong type (DTConfig's own checks raise ConfigError)
        raise ConfigError(f"bench methods: 'dt'={given!r}: {e}") from e


class _Workload:
    """What a timed step needs of one model: a fresh copy, its adapter site, a batch and the loss."""

    def __init__(self, cfg: dict[str, Any], device: torch.device):
        self.cfg, self.device = cfg, device
        n = cfg["batch_size"]
        if cfg["model"] == "dt":
            from agents.bench import random_episodes  # heavy: agents.bench imports metaworld
            from agents.data import WindowSampler  # heavy: agents.data imports metaworld
            # heavy: agents.dt imports metaworld
            from agents.dt import SITE, batch_loss, forward_batch, layer_tokens

            self.dt_cfg = dt_config(cfg)
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
    """Time each method's training step; return per-method ms/step, peak memory and ratios.

    Every method's model, trainer and (with ``compile=true``) compiled step are built and warmed up first
    and kept alive; then ``rounds`` rounds in which each method runs its share of ``steps`` in turn
    (:func:`_time_rounds`). A method that fails, or whose compiled step graph-breaks or recompiles, gets
    an ``error`` row and no figure; the others' figures stand.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = validate(BenchSettings, overrides, "bench methods", "bench setting").model_dump(exclude_none=True)
    if given["model"] == "dt" and ("backbone" in given or "img_size" in given):
        raise ConfigError("bench methods: 'backbone' and 'img_size' are ViT settings; with model=dt use "
                          "'tiny' (true: a 2-layer width-32 DT; false: the paper's DT) and 'batch_size'")
    if given["model"] != "dt" and "dt" in given:
        raise ConfigError("bench methods: 'dt' sets the DT's fields; add model=dt")
    cfg = {**_defaults(device.type == "cuda", given["model"]), **given}
    if given.get("compile_mode") and not cfg["compile"]:
        raise ConfigError(f"bench methods: 'compile_mode'={given['compile_mode']!r} needs compile=true")
    if cfg["rounds"] > cfg["steps"]:
        raise ConfigError(f"bench methods: 'rounds'={cfg['rounds']} is more than 'steps'={cfg['steps']}: every "
                          f"round times at least one step of each method; use 1 to {cfg['steps']} rounds or "
                          "more steps")
    for name in cfg["methods"]:
        get_method(name)  # an unknown name fails here, listing the valid ones
    if cfg.get("inductor") and not cfg["compile"]:
        raise ConfigError("bench methods: 'inductor' settings change compiled code only; add compile=true")
    check_inductor_options(cfg.get("inductor"), "bench methods")
    if cfg["model"] == "dt":
        dt_config(cfg)  # a bad field fails before any model is built
    work = _Workload(cfg, device)
    rows: dict[str, Any] = {}
    align, in_place = low_rank.RANK_ALIGN, low_rank.EAGER_IN_PLACE
    if cfg.get("rank_align") is not None:
        low_rank.RANK_ALIGN = cfg["rank_align"]
    if cfg.get("eager_in_place") is not None:
        low_rank.EAGER_IN_PLACE = cfg["eager_in_place"]
    from harness.methods import fast_peft  # heavy: harness.methods.fast_peft imports peft

    vera_merge, plain_scales = fast_peft.VERA_MERGE, fast_peft.PLAIN_RANDLORA_SCALES
    if cfg.get("randlora_scales") is not None:
        fast_peft.PLAIN_RANDLORA_SCALES = cfg["randlora_scales"] == "plain"
    if cfg.get("vera_merge") is not None:
        fast_peft.VERA_MERGE = cfg["vera_merge"]
    grouped = grouped_operands.GROUPED_EAGER
    if cfg.get("grouped") is not None:
        grouped_operands.GROUPED_EAGER = cfg["grouped"]
    eva_key = eva_init.FAST_INPUT_KEY
    if cfg.get("eva_input_key") is not None:
        eva_init.FAST_INPUT_KEY = cfg["eva_input_key"] == "fast"
    precision = torch.get_float32_matmul_precision()
    if cfg.get("matmul_precision") is not None:
        torch.set_float32_matmul_precision(cfg["matmul_precision"])
    compiled = cfg["compile"] and device.type == "cuda"
    kernels = kernel_choices(cfg.get("inductor"), cfg.get("sdpa_backends"))
    try:
        with tempfile.TemporaryDirectory() as tmp, _strict_dynamo(compiled), kernels:
            bank = _bank(work, Path(tmp)) if "eigenlora" in cfg["methods"] else []
            synchronize(device)
            # what every method's process held before its own model: the batch (and, while it lives, the
            # bank's files are on disk, not on the device)
            shared = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            runs: dict[str, _Run] = {}
            for name in cfg["methods"]:
                started = time.perf_counter()
                try:
                    runs[name] = _prepare(name, cfg, work, bank, compiled)
                except Exception as e:  # one method's failure must not hide the others' figures
                    rows[name] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"[bench] {name}: {rows[name]}", file=sys.stderr, flush=True)
                    continue
                # no figure exists before the rounds: a run cut short shows how far the building got
                print(f"[bench] {name}: built, {'compiled, ' if compiled else ''}warmed up in "
                      f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            _time_rounds(runs, cfg, device, compiled, rows)
            for name in cfg["methods"]:
                if name in runs and name not in rows:
                    rows[name] = runs[name].row(cfg, work, shared)
                    print(f"[bench] {name}: {rows[name]}", file=sys.stderr, flush=True)
    finally:
        low_rank.RANK_ALIGN, low_rank.EAGER_IN_PLACE = align, in_place
        fast_peft.VERA_MERGE, fast_peft.PLAIN_RANDLORA_SCALES = vera_merge, plain_scales
        grouped_operands.GROUPED_EAGER = grouped
        eva_init.FAST_INPUT_KEY = eva_key
        torch.set_float32_matmul_precision(precision)
    rows = {name: rows[name] for name in cfg["methods"]}
    cfg["rank_align"] = low_rank.RANK_ALIGN if cfg.get("rank_align") is None else cfg["rank_align"]
    cfg["grouped"] = grouped_operands.GROUPED_EAGER if cfg.get("grouped") is None else cfg["grouped"]
    cfg["eager_in_place"] = low_rank.EAGER_IN_PLACE if cfg.get("eager_in_place") is None else cfg["eager_in_place"]
    for ref in ("full", "lora"):
        base = rows.get(ref, {}).get("ms_per_round")
        if not base:
            continue
        for r in rows.values():
            if "ms_per_round" not in r:
                continue
            # the ratio within each round, then its median: both figures of a round are taken in the same
            # minute, so drift of the clock or the chip's temperature across the run cancels
            ratios = [mine / theirs for mine, theirs in zip(r["ms_per_round"], base)]
            r[f"time_vs_{ref}"] = round(statistics.median(ratios), 3)
            r[f"time_vs_{ref}_min"], r[f"time_vs_{ref}_max"] = round(min(ratios), 3), round(max(ratios), 3)
            if r.get("peak_mb") and rows[ref].get("peak_mb"):
                r[f"memory_vs_{ref}"] = round(r["peak_mb"] / rows[ref]["peak_mb"], 3)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "config": cfg,
              "methods": rows}
    if cfg["model"] == "dt":
        from agents.dt import flops_per_step  # heavy: agents.dt imports metaworld

        # full fine-tuning's model FLOPs (bench rl's count), so its row reads as a share of the chip's peak
        flops = flops_per_step(work.dt_cfg, cfg["batch_size"])
        result["full_flops_per_step"] = flops
        if rows.get("full", {}).get("ms_per_step"):
            rows["full"]["tflops_per_s"] = round(flops / rows["full"]["ms_per_step"] / 1e9, 1)
    return result


@contextlib.contextmanager
def _strict_dynamo(compiled: bool):
    """While the bench runs compiled steps: a fresh dynamo, and hitting the recompile limit raises instead
    of running the frame eager from then on (which would time eager code under a compiled label)."""
    if not compiled:
        yield
        return
    torch._dynamo.reset()
    # older torch builds lack the flag: the rounds' fail_on_recompile stance still refuses recompiles there
    strict = ({"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit")
              else {})
    try:
        with torch._dynamo.config.patch(**strict):
            yield
    finally:
        torch._dynamo.reset()


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"]}


def check_compiled(name: str, before: dict[str, int], after: dict[str, int]) -> None:
    """Raise if a method's compiled step did not run as one graph: a graph break (the code around it runs
    eager, and its frames are shared with the other methods') or no graph at all (the step ran eager)."""
    from torch._dynamo.utils import counters

    breaks = after["graph_breaks"] - before["graph_breaks"]
    if breaks:
        reasons = "; ".join(sorted(counters["graph_break"]))[:1000]
        raise RuntimeError(f"{name}: the compiled step graph-broke {breaks} time(s), so part of it ran eager "
                           f"and its time is not a compiled step's ({reasons})")
    if after["graphs"] <= before["graphs"]:
        raise RuntimeError(f"{name}: the compiled step produced no graph: it ran eager")


@dataclass
class _Run:
    """One method's live workload: its trainer, and what its warm-up and rounds measured."""

    name: str
    method: Any
    model: nn.Module
    trainer: Trainer
    resident: int  # bytes its own model, optimiser state and caches hold between steps
    peak: int  # bytes above what was allocated before it, at its highest so far
    phases: dict[str, Any] | None = None
    wrap_s: float = 0.0  # the method's wrap of the built model, its initialisation included (EVA, PiSSA)
    ms_per_round: list[float] = field(default_factory=list)

    def row(self, cfg: dict[str, Any], work: _Workload, shared: int) -> dict[str, Any]:
        ms = statistics.median(self.ms_per_round)
        own, head = self.method.count(self.model, work.site)
        peak = (shared + self.peak) / 2**20 if work.device.type == "cuda" else None
        row = {"ms_per_step": round(ms, 2), work.unit: round(cfg["batch_size"] * 1000 / ms, 1),
               "ms_per_step_min": round(min(self.ms_per_round), 2),
               "ms_per_step_max": round(max(self.ms_per_round), 2),
               "ms_per_round": [round(m, 3) for m in self.ms_per_round],
               "peak_mb": round(peak, 1) if peak else None, "trainable_params": own, "head_params": head,
               "wrap_s": round(self.wrap_s, 3)}
        if self.phases is not None:
            row["phases"] = self.phases
        return row


def _prepare(name: str, cfg: dict[str, Any], work: _Workload, bank, compiled: bool) -> _Run:
    """Build one method's model and trainer (through the training loop trials use), compile its step where
    asked, and run its ``warmup`` untimed steps (and the profiled ones)."""
    device = work.device
    method = get_method(name)
    settings = method.default_settings()
    batch = work.batch
    extra = cfg["profile_steps"] if cfg["profile"] else 0
    ctx = MethodContext(total_steps=cfg["steps"] + cfg["warmup"] + extra, device=device, adapter_bank=bank,
                        init_batches=lambda: [batch] * 4, forward_fn=work.forward_fn,
                        layer_inputs_fn=work.layer_inputs_fn, validate=lambda m: 0.0)
    synchronize(device)
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    built = work.model()
    synchronize(device)
    started = time.perf_counter()
    model = method.wrap(built, work.site, settings, ctx).to(device)
    synchronize(device)
    wrap_s = time.perf_counter() - started
    if not cfg["fast"]:
        from harness.methods import fast_peft  # heavy: harness.methods.fast_peft imports peft

        fast_peft.disable(model)
    loop = LoopConfig(steps=cfg["warmup"] + extra + cfg["steps"], lr=1e-4, report_every=0, compile=False)
    hooks = MethodHooks(method, ctx)
    trainer = Trainer(model, work.loss, lambda: batch, loop, device, hooks)
    if compiled:
        trainer.compute_loss = compiled_loss(own_frame(trainer._loss, f"bench_step_{name}"),
                                             cfg.get("compile_mode") or "default", cfg.get("inductor"))
    counts = _dynamo_counts()
    for _ in range(cfg["warmup"]):
        trainer.step()
    # the profiled steps come before the timed ones, so that a method's schedule (AdaLoRA's budget phase)
    # is profiled where most of a trial's steps are, not in its final phase
    phases = profile_phases(trainer, hooks, batch, extra, cfg["profile_top"]) if extra else None
    synchronize(device)
    if compiled:
        check_compiled(name, counts, _dynamo_counts())
    resident = (torch.cuda.memory_allocated() - before) if cuda else 0
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else 0
    return _Run(name, method, model, trainer, resident, peak, phases, wrap_s)


def _time_rounds(runs: dict[str, _Run], cfg: dict[str, Any], device: torch.device, compiled: bool,
                 errors: dict[str, Any]) -> None:
    """``cfg['rounds']`` rounds of every method's share of ``cfg['steps']`` timed steps (the shares differ by
    at most one step between rounds, never between methods in one round), the method order rotated each
    round so that none always runs after the same one. Per method and round: ms per step into
    ``ms_per_round``, and the peak memory as if it ran alone (its resident bytes plus what its steps
    allocated above what was allocated when they began, the other methods' models included there).
    A method that fails gets its row in ``errors`` and leaves the rounds.

    Compiled, the rounds run under dynamo's ``fail_on_recompile`` stance: a compilation inside a timed
    round (a guard that failed on a later step) would bill compile time to the method, so it raises."""
    rounds, steps = cfg["rounds"], cfg["steps"]
    shares = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    stance = torch.compiler.set_stance("fail_on_recompile") if compiled else contextlib.nullcontext()
    # the compiled graphs and every method's live model are many objects: a full collection that the
    # garbage collector starts inside a timed round would bill its pause to whichever method runs then
    gc.collect()
    gc.freeze()
    try:
        with stance:
            _rounds(runs, shares, device, errors)
    finally:
        gc.unfreeze()


def _rounds(runs: dict[str, _Run], shares: list[int], device: torch.device, errors: dict[str, Any]) -> None:
    """The rounds of :func:`_time_rounds`, ``shares[r]`` steps of each method in round ``r``."""
    cuda = device.type == "cuda"
    for r, share in enumerate(shares):
        order = list(runs)
        if order:
            order = order[r % len(order):] + order[:r % len(order)]
        for name in order:
            run = runs[name]
            try:
                synchronize(device)
                if cuda:
                    allocated = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(share):
                    if not run.trainer.step():
                        raise RuntimeError(f"{name}: the trainer ran out of steps in round {r}")
                synchronize(device)
                run.ms_per_round.append((time.perf_counter() - start) * 1000 / share)
                if cuda:
                    run.peak = max(run.peak, run.resident + torch.cuda.max_memory_allocated() - allocated)
            except Exception as e:  # one method's failure must not hide the others' figures
                errors[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[bench] {name}: {errors[name]}", file=sys.stderr, flush=True)
                del runs[name]


PHASES = ("forward", "extra_loss", "backward", "optimizer", "on_step")


def profile_phases(trainer: Trainer, hooks: MethodHooks, batch: Any, steps: int, top: int = 12,
                   by_name: dict[str, Counter] | None = None) -> dict[str, Any]:
    """Where one training step goes, per phase (:data:`PHASES`): ms per step, with the device synchronised
    at every phase boundary (so a phase's figure is its own host and device time, and the phases sum to
    more than an unsynchronised step), and the kernels (CUDA) or top-level aten calls (CPU) that a step
    launches in each phase, from ``torch.profiler`` over the last of the ``steps`` steps.

    The steps are the trainer's next ``steps`` (its compiled loss, optimiser and the method's hooks, in its
    order, with the trainer's step numbers for the method's ``on_step`` schedule), and count as done.
    ``by_name``, if given, gets the counted kernels or calls per phase by name
    (``benchmarks/scripts/calls_by_op.py``).
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
        else:
            counted = top_level_aten_call(e)
        if counted:
            for name, (start, end) in spans.items():
                if start <= e.time_range.start <= end:
                    launches[name] += 1
                    if by_name is not None:
                        by_name.setdefault(name, Counter())[e.name] += 1
                    break
    return {"ms": {k: round(v * 1000 / steps, 3) for k, v in seconds.items()},
            "kernels" if cuda else "aten_calls": launches, **time_by_kind(prof, cuda, top)}


def top_level_aten_call(event) -> bool:
    """Whether a profiler event is an aten call not made by another aten call: one dispatch from Python or
    autograd, what an eager step pays host time for (issue 21)."""
    parent = event.cpu_parent
    return event.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::"))


# Substrings that name a kernel's (CUDA) or an aten call's (CPU) kind, tried in this order.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "scaled_dot_product", "_efficient_")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("fused", ("triton",)),
)


def kernel_kind(name: str) -> str:
    """``attention``, ``matmul``, ``fused`` (inductor's generated kernels) or ``other``, from a kernel's or
    an aten call's name."""
    low = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def time_by_kind(prof: Any, cuda: bool, top: int = 12) -> dict[str, Any]:
    """Where the profiled step's time went: per kind (:func:`kernel_kind`) the device time of its kernels
    (CUDA) or the self CPU time of its aten calls (CPU), in ms, their sum (``kernel_ms``), and the ``top``
    kernels or calls by time with their counts. Tells a step bound by its matrix products from one bound by
    everything else, and (``kernel_ms`` against the step's time) one that leaves the device idle; on CUDA
    ``top_host_calls`` then lists the aten calls by their own host time, where that idle time goes."""
    totals: dict[str, float] = {}
    rows = []
    host = []  # on CUDA: the aten calls by their own host time, which tells what an idle device waits for
    for e in prof.key_averages():
        if cuda and e.key.startswith("aten::") and e.self_cpu_time_total > 0:
            host.append((e.self_cpu_time_total, e.key, e.count))
        if cuda:
            # the phases' own ranges (record_function, and the optimizer's) show on the device's timeline
            # too, spanning kernels counted below: they are no kernels
            if (e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False)
                    or e.key in PHASES or e.key.startswith(("Optimizer.", "ProfilerStep"))):
                continue
            us = e.self_device_time_total
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        kind = kernel_kind(e.key)
        totals[kind] = totals.get(kind, 0.0) + us
        rows.append((us, e.key, e.count, kind))
    rows.sort(reverse=True)
    return {"time_by_kind_ms": {k: round(v / 1000, 3) for k, v in sorted(totals.items())},
            "kernel_ms": round(sum(totals.values()) / 1000, 3),
            "top_kernels": [{"name": n[:120], "ms": round(us / 1000, 3), "count": c, "kind": k}
                            for us, n, c, k in rows[:top]],
            **({"top_host_calls": [{"name": n, "host_ms": round(us / 1000, 3), "count": c}
                                   for us, n, c in sorted(host, reverse=True)[:top]]} if cuda else {})}

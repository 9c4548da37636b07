"""The one training loop of the harness: fine-tuning trials and backbone pretraining on both tracks.

nanoGPT-style: AdamW (fused on CUDA; no decay on biases, norms, embeddings), the one learning-rate
:class:`Schedule` (linear warm-up, then one cosine cycle to ``min_lr_ratio`` x lr), optional gradient clipping, bf16 autocast on CUDA, optional ``torch.compile``,
finite-loss checks (batched on CUDA, so the GPU is not waited on every update), the method's
``extra_loss`` and ``on_step`` hooks, progress reports and resumable, atomically written checkpoints.

:class:`Trainer` advances one update per :meth:`Trainer.step`, so an engine can interleave the updates of
several trials in one process; :func:`train` runs one to the end.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, get_args

import torch
from torch import nn

from harness import process_cache
from harness.errors import ConfigError, NonFiniteLossError
from harness.placement import trial_device
from harness.validation import CompileMode


# --- optimiser and schedule -------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norms, embeddings and 1-d tensors (GPT convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "norm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_adamw(model: nn.Module, lr: float, weight_decay: float, groups: list[dict] | None = None
               ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (fused on CUDA). ``groups``: a method's own parameter groups
    (``Method.optimizer_groups``, checked by :func:`check_groups`), else :func:`param_groups`."""
    groups = check_groups(model, groups, weight_decay) if groups is not None else param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=on_cuda or None)


def check_groups(model: nn.Module, groups: list[dict], weight_decay: float) -> list[dict]:
    """A method's own optimiser groups, checked: each a dict with ``params`` (trainable parameters of the
    model) and optionally ``lr_scale`` (a positive factor on the scheduled learning rate, e.g. LoRA+'s
    larger rate for B) and ``weight_decay`` (default: the trial's); every trainable parameter in exactly
    one group. Returns fresh dicts, so the method's own are not changed."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen: set[int] = set()
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ConfigError(f"optimizer group {i}: expected a dict with 'params', got {g!r:.80}")
        unknown = set(g) - {"params", "lr_scale", "weight_decay"}
        if unknown:
            raise ConfigError(f"optimizer group {i}: unknown keys {sorted(unknown)}; a group takes params, lr_scale "
                              "and weight_decay (the schedule sets the learning rate)")
        params = list(g["params"])
        for p in params:
            if id(p) not in trainable:
                raise ConfigError(f"optimizer group {i}: parameter {names.get(id(p), '(not in the model)')!r} is "
                                  "not a trainable parameter of the model")
            if id(p) in seen:
                raise ConfigError(f"optimizer group {i}: parameter {names[id(p)]!r} is in two groups")
            seen.add(id(p))
        scale = g.get("lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"optimizer group {i}: lr_scale {scale!r} must be a positive finite number")
        wd = g.get("weight_decay", weight_decay)
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ConfigError(f"optimizer group {i}: weight_decay {wd!r} must be a finite number >= 0")
        if params:
            out.append({"params": params, "lr_scale": float(scale), "weight_decay": float(wd)})
    left = [names[i] for i in trainable - seen]
    if left:
        raise ConfigError(f"optimizer groups leave trainable parameters out: {sorted(left)[:5]}"
                          f"{' ...' if len(left) > 5 else ''}; every trainable parameter belongs to one group")
    return out


@dataclass
class Schedule:
    """The one learning-rate schedule of the harness, with the same meaning everywhere (both tracks'
    fine-tuning and pretraining, the benches): linear warm-up to ``lr`` over ``warmup`` updates, then one
    cosine cycle down to ``min_lr_ratio x lr`` at update ``steps`` (:meth:`lr_at`).

    The floor is relative, so it follows whatever rate the trial trains at (a method's ``lr`` setting or
    ``default_lr`` replaces the track's, :func:`harness.finetune.optimiser_settings`): the RL papers' 1e-6
    at lr 1e-4 and the vision recipe's 1% are both ``min_lr_ratio = 0.01``. A track hands one to the
    engine in its ``FineTuneSetup`` with the track's own ``lr`` and ``weight_decay``."""

    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup: int = 0  # updates, absolute (tracks derive it from their settings: updates, epochs)
    min_lr_ratio: float = 0.01  # the cosine's floor as a fraction of ``lr``
    grad_clip: float = 0.0  # 0: no clipping
    report_every: int = 50  # 0: no progress reports
    steps_per_epoch: int = 0  # >0: reports carry the epoch

    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step`` (0-based)."""
        return warmup_cosine(step, self.steps, self.warmup, self.lr, self.lr * self.min_lr_ratio)


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` updates, then one cosine cycle down to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled ``lr`` on every group, times the group's ``lr_scale`` where a method set one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op context elsewhere (CPU bf16 is slower than fp32 on small models)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_trainer_frames = itertools.count()


def own_frame(fn: Callable[[Any], torch.Tensor], name: str) -> Callable[[Any], torch.Tensor]:
    """``fn`` called from a function whose code object is new, named ``name`` in dynamo's logs.

    Dynamo keeps compiled graphs, guards and recompile counts per code object. Every trainer compiles the
    same ``Trainer._loss``, so trainers alive at once (the methods bench), or one after another in one
    process (the trials of a reused Ray actor), would each add a cache entry to that one frame: past
    ``recompile_limit`` the rest would run eager, a later trainer would inherit the earlier ones' shape
    decisions, and every call would check the others' guards first. A copy of the caller's code per
    trainer gives each its own frame and graph, freed with it."""
    def call(batch: Any) -> torch.Tensor:
        return fn(batch)

    code = call.__code__.replace(co_name=name.replace("-", "_"))
    return types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)


# Where a Trainer with ``compile`` compiles, and with what: CUDA and inductor. The tests add the CPU with a
# cheaper backend, to run the compiled paths (a frame shared by trainers) without a GPU.
COMPILED_DEVICES: tuple[str, ...] = ("cuda",)
COMPILE_BACKEND: Any = "inductor"


# Inductor settings every compiled step gets on top of its mode's, where this torch has them. Inductor's
# "mixed-order" LayerNorm backward (one kernel for the input's row reduction and the weight's column
# reduction) ran far below the memory bandwidth, and split the DT's and ViT-B's full fine-tuning steps
# got faster, the others unchanged (BENCHMARKS.md, "The DT's LayerNorm backward split").
INDUCTOR_DEFAULTS: dict[str, Any] = {"triton.mix_order_reduction": False}


def check_inductor_options(inductor: dict[str, Any] | None, who: str = "inductor") -> None:
    """Refuse an inductor setting this torch does not have, or a value of another type than the setting's
    (``torch._inductor.config``'s dotted names), before anything runs."""
    if not inductor:
        return
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    for key, value in inductor.items():
        if key not in known:
            near = sorted(k for k in known if key.split(".")[-1] in k)[:5]
            raise ConfigError(f"{who}: 'inductor' setting {key!r} is not in this torch's "
                              f"torch._inductor.config" + (f"; similar: {near}" if near else ""))
        want = type(known[key])
        if known[key] is not None and not (type(value) is want or (want is float and type(value) is int)):
            raise ConfigError(f"{who}: 'inductor' setting {key!r} takes a "
                              f"{want.__name__} (now {known[key]!r}), got {value!r}")


def inductor_options(mode: str, inductor: dict[str, Any] | None = None) -> dict[str, Any]:
    """torch.compile's ``options`` for ``mode``: the mode's own settings, then :data:`INDUCTOR_DEFAULTS`
    that this torch has, then ``inductor`` (which wins)."""
    import torch._inductor as inductor_pkg
    import torch._inductor.config as inductor_config

    if mode not in get_args(CompileMode):
        raise ConfigError(f"torch.compile mode {mode!r}: expected one of {list(get_args(CompileMode))}")
    check_inductor_options(inductor)
    known = inductor_config.get_config_copy()
    return {**inductor_pkg.list_mode_options(mode), **{k: v for k, v in INDUCTOR_DEFAULTS.items() if k in known},
            **(inductor or {})}


def compiled_loss(loss: Callable[[Any], torch.Tensor], mode: str,
                  inductor: dict[str, Any] | None = None) -> Callable[[Any], torch.Tensor]:
    """``loss`` compiled with torch.compile ``mode`` (and :func:`inductor_options`). Under CUDA graphs
    (reduce-overhead) each call starts a new graph step and its loss is copied out of the graph's memory,
    which the next replay overwrites (the training loop keeps losses for its batched finite checks)."""
    options = inductor_options(mode, inductor)
    if COMPILE_BACKEND != "inductor":  # the tests' CPU backend: modes and options are inductor's
        return torch.compile(loss, backend=COMPILE_BACKEND)
    fn = torch.compile(loss, options=options)
    if mode != "reduce-overhead":
        return fn

    def run(batch: Any) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return fn(batch).clone()

    return run


def structure_key(model: nn.Module) -> tuple:
    """What a compiled loss's graph takes from ``model`` besides its tensors' values: each module's path and
    class, each parameter's and buffer's path, shape, dtype, device and whether it trains. Models with the
    same key trace to the same graph unless a Python attribute differs, which dynamo's guards then catch."""
    modules = tuple((name, type(m).__module__, type(m).__qualname__) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad)
                    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()))
    return modules, tensors


class SharedLoss:
    """``loss_fn(model, batch)`` under autocast, compiled once for the trainers of one process whose models
    have one structure (:func:`structure_key`): a reused Ray actor's next trial of the same method and shapes
    runs the graph the last one compiled instead of tracing and loading it again.

    A trial must still get the kernels a process of its own would compile, so once the graph exists every
    call runs under dynamo's ``fail_on_recompile``: a call that would compile another graph into the shared
    frame (a guard failed: the model or batch differ in something the key does not hold) raises instead,
    before anything runs, and that trainer compiles in a frame of its own from then on, as it would have
    without sharing. The shared frame thus holds one graph and never makes another trial's shape decisions.
    ``mode`` is torch.compile's; under ``reduce-overhead`` each trainer's first call records the CUDA graphs
    anew for its own parameters (``process_cache.share_graphs``)."""

    def __init__(self, loss_fn: LossFn, device: torch.device, mode: str = "default"):
        def step(model_and_batch: tuple[nn.Module, Any]) -> torch.Tensor:  # the model is an input, not a constant
            model, batch = model_and_batch
            with autocast(device):
                return loss_fn(model, batch)

        self.fn = compiled_loss(own_frame(step, f"shared_loss_{next(_trainer_frames)}"), mode)
        self.traced = False

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss; raises :class:`RecompileRefused` where the shared graph does not fit this call."""
        if not self.traced:
            loss = self.fn((model, batch))
            self.traced = True
            return loss
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self.fn((model, batch))
        except RuntimeError as e:
            if "fail_on_recompile" not in str(e):
                raise
            raise RecompileRefused(str(e)) from e


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class RecompileRefused(RuntimeError):
    """A call of a :class:`SharedLoss` that its graph's guards refused (it would have compiled another)."""


def pick_device(requested: str = "auto") -> torch.device:
    """The device for this process's work: the trial's own GPU under Ray (``harness/placement.py``)."""
    return trial_device(requested)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the loop -----------------------------------------------------------------------------------------

class StepHooks(Protocol):
    """What a method adds to the loop (``harness.methods.Method`` bound to its trial context)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...

    def on_step(self, model: nn.Module, step: int) -> None: ...


@dataclass
class LoopConfig(Schedule):
    """One run of the loop: its :class:`Schedule` and how the loop runs it."""

    compile: bool = False  # torch.compile the training forward (CUDA only)
    compile_mode: str = "default"  # torch.compile's mode where ``compile`` (harness.validation.CompileMode)
    checkpoint: Path | None = None  # resume from it when present; write it every checkpoint_every and at the end
    checkpoint_every: int = 0
    time_data: bool = False  # measure the share of step time spent producing batches (synchronises CUDA)
    # updates between finite-loss checks; each check waits for the GPU, so on CUDA they are batched
    # (a non-finite loss is still reported at the update where it first appeared). 0: every report, at
    # most 50 updates apart, on CUDA; every update elsewhere.
    check_every: int = 0


@dataclass
class TrainStats:
    steps: int
    final_loss: float = float("nan")
    losses: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    steps_per_s: float = 0.0
    resumed_from: int = 0
    data_share: float = 0.0
    # after the first updates (compilation, allocator and cuDNN warm-up): what an update of the method costs
    steady_ms_per_update: float = 0.0
    compiled_step: str = ""  # Trainer.compiled_step: own | shared | own after shared; "" when not compiled
    # graphs dynamo compiled while this trainer trained (0 for one that ran a shared graph): more than one
    # means something the graph depends on (a batch's shape, a Python attribute) changed between updates,
    # and each change cost a compilation (issue 20: an epoch's short batch did so in every VTAB trial)
    graphs_compiled: int = 0


LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Trainer:
    """Trains ``model`` (already on ``device``) on ``loss_fn(model, next_batch())``, one update per step()."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, next_batch: Callable[[], Any], cfg: LoopConfig,
                 device: torch.device, hooks: StepHooks | None = None,
                 report: Callable[[dict[str, Any]], None] | None = None, groups: list[dict] | None = None):
        self.model, self.loss_fn, self.next_batch, self.cfg = model, loss_fn, next_batch, cfg
        self.device, self.hooks, self.report = device, hooks, report
        self.optimizer = make_adamw(model, cfg.lr, cfg.weight_decay, groups)
        self.step_index = 0
        if cfg.checkpoint is not None and Path(cfg.checkpoint).is_file():
            self.step_index = resume_checkpoint(Path(cfg.checkpoint), model, self.optimizer)
        # One compiled graph for forward and loss (the method's extra loss and hooks stay eager), in a
        # dynamo frame of this trainer's own (``own_frame``), or one that the process's trainers of the same
        # structure share (``SharedLoss``, unless HARNESS_SHARE_COMPILED=0; under CUDA graphs unless
        # HARNESS_SHARE_GRAPHS=0 too, since the compiled function is bound to the graph trees that
        # ``process_cache.begin_trial`` then keeps for a while; and a loss that is a plain function, since
        # the process keeps it: a closure could hold a trial's data)
        self.compute_loss: Callable[[Any], torch.Tensor] = self._loss
        self._shared: SharedLoss | None = None
        self.compiled_step = ""  # own | shared | own after shared (a guard refused the shared graph)
        if cfg.compile and device.type in COMPILED_DEVICES:
            plain = isinstance(loss_fn, types.FunctionType) and loss_fn.__closure__ is None
            mode = cfg.compile_mode
            if plain and (process_cache.share_compiled() if mode == "default" else
                          mode == "reduce-overhead" and process_cache.share_graphs()):
                key = ("loss", loss_fn, mode, str(device), structure_key(model))
                self._shared = process_cache.shared_step(key, lambda: SharedLoss(loss_fn, device, mode),
                                                         graphs=mode == "reduce-overhead")
                self.compute_loss, self.compiled_step = self._shared_loss, "shared"
            else:
                self.compute_loss = self._own_compiled_loss()
                self.compiled_step = "own"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stats = TrainStats(steps=cfg.steps, resumed_from=self.step_index)
        self._graphs_before = _graphs_compiled() if self.compiled_step else 0
        self.check_every = cfg.check_every or (min(50, cfg.report_every or 50) if device.type == "cuda" else 1)
        self._pending: list[torch.Tensor] = []  # losses not yet checked, the last one at step_index - 1
        self._wall = 0.0
        self._data_time = 0.0
        # updates before this one are warm-up and stay out of steady_ms_per_update
        self._steady_from = self.step_index + min(20, max(0, (cfg.steps - self.step_index) // 5))
        self._steady_start: float | None = None
        self._modes_set = False  # the whole model put in train mode at this trainer's first update

    def _loss(self, batch: Any) -> torch.Tensor:
        with autocast(self.device):
            return self.loss_fn(self.model, batch)

    def _own_compiled_loss(self) -> Callable[[Any], torch.Tensor]:
        return compiled_loss(own_frame(self._loss, f"trainer_loss_{next(_trainer_frames)}"), self.cfg.compile_mode)

    def _shared_loss(self, batch: Any) -> torch.Tensor:
        assert self._shared is not None
        try:
            return self._shared(self.model, batch)
        except RecompileRefused:
            self.compute_loss, self.compiled_step = self._own_compiled_loss(), "own after shared"
            self._shared = None
            return self.compute_loss(batch)

    def _check_pending(self) -> float:
        """Raise NonFiniteLossError at the first non-finite pending loss; return the last loss."""
        values = torch.stack(self._pending).float().cpu()  # the one host sync of a check
        first = self.step_index - len(self._pending)
        self._pending.clear()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLossError(first + i, float(values[i]))
        return float(values[-1])

    @property
    def done(self) -> bool:
        return self.step_index >= self.cfg.steps

    def step(self) -> bool:
        """One optimiser update; False (and nothing done) once every update has run."""
        if self.done:
            return False
        cfg, model, step = self.cfg, self.model, self.step_index
        if step == self._steady_from:
            synchronize(self.device)  # the warm-up's queued work is not billed to the steady updates
            self._steady_start = time.perf_counter()
        started = time.perf_counter()
        if not self._modes_set or not model.training:
            # Every module trains, the frozen base too: a track that built its model in eval mode and a
            # method that wrapped it (peft keeps the wrapped model's modes) would otherwise train without
            # the base's dropout, unlike full fine-tuning. Later, a validation may have left it in eval mode.
            model.train()
            self._modes_set = True
        if cfg.time_data:
            synchronize(self.device)  # the previous step's kernels are not billed to the data
            t0 = time.perf_counter()
        batch = self.next_batch()
        if cfg.time_data:
            synchronize(self.device)
            self._data_time += time.perf_counter() - t0
        set_lr(self.optimizer, cfg.lr_at(step))
        loss = self.compute_loss(batch)
        if self.hooks is not None:
            reg = self.hooks.extra_loss(model)
            if reg is not None:
                loss = loss + reg
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        if self.hooks is not None:
            self.hooks.on_step(model, step)  # before zero_grad: AdaLoRA reads the gradients
        self.optimizer.zero_grad(set_to_none=True)
        self._pending.append(loss.detach())
        self.step_index = done = step + 1
        report_due = bool(cfg.report_every) and (done % cfg.report_every == 0 or done == cfg.steps)
        if report_due or done % self.check_every == 0 or done == cfg.steps:
            value = self._check_pending()
            self.stats.final_loss = value
            if report_due:
                self.stats.losses.append((done, value))
                if self.report is not None:
                    entry: dict[str, Any] = {"update": done, "loss": value}
                    if cfg.steps_per_epoch:
                        entry["epoch"] = round(done / cfg.steps_per_epoch, 2)
                    self.report(entry)
        if cfg.checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                and done < cfg.steps:
            save_checkpoint(Path(cfg.checkpoint), model, self.optimizer, done)
        self._wall += time.perf_counter() - started
        return True

    def state_dict(self) -> dict[str, Any]:
        """What continuing from here needs: the trainable parameters and buffers (frozen weights are
        rebuilt as they were), the optimiser, the update count and the loss history. Checks the losses
        still pending first, so a checkpoint never holds an unchecked non-finite loss."""
        if self._pending:
            self.stats.final_loss = self._check_pending()
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=True).items()
                       if not isinstance(v, nn.Parameter) or v.requires_grad}
        return {"model": model_state, "optimizer": self.optimizer.state_dict(), "step": self.step_index,
                "losses": list(self.stats.losses), "final_loss": self.stats.final_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a trainer built the same way (same model, same config)."""
        missing = self.model.load_state_dict(state["model"], strict=False).unexpected_keys
        if missing:
            raise ValueError(f"checkpoint holds tensors this model lacks: {missing[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.stats.losses = [tuple(x) for x in state["losses"]]
        self.stats.final_loss = float(state["final_loss"])
        self.stats.resumed_from = self.step_index
        self._steady_from = self.step_index + min(20, max(0, (self.cfg.steps - self.step_index) // 5))

    def steady_ms_per_update(self) -> float:
        """Milliseconds per update since the warm-up ended, up to now (0.0 before any steady update)."""
        if self._steady_start is None or self.step_index <= self._steady_from:
            return 0.0
        return 1000 * (time.perf_counter() - self._steady_start) / (self.step_index - self._steady_from)

    def finish(self) -> TrainStats:
        """Final checkpoint and statistics; the model is left in eval mode."""
        cfg, stats = self.cfg, self.stats
        if cfg.checkpoint is not None and cfg.steps > stats.resumed_from:
            save_checkpoint(Path(cfg.checkpoint), self.model, self.optimizer, cfg.steps)
        started = time.perf_counter()
        synchronize(self.device)  # the queued GPU work belongs to the training time
        self._wall += time.perf_counter() - started
        stats.steady_ms_per_update = self.steady_ms_per_update()
        stats.compiled_step = self.compiled_step
        if self.compiled_step:
            stats.graphs_compiled = _graphs_compiled() - self._graphs_before
        self.model.eval()
        stats.wall_s = self._wall
        ran = self.step_index - stats.resumed_from
        stats.steps_per_s = ran / self._wall if self._wall > 0 else 0.0
        stats.data_share = self._data_time / self._wall if self._wall > 0 else 0.0
        return stats


def train(model: nn.Module, loss_fn: LossFn, next_batch: Callable[[], Any], cfg: LoopConfig, device: torch.device,
          hooks: StepHooks | None = None, report: Callable[[dict[str, Any]], None] | None = None) -> TrainStats:
    """Run every update of a :class:`Trainer` and return its statistics."""
    trainer = Trainer(model, loss_fn, next_batch, cfg, device, hooks, report)
    while trainer.step():
        pass
    return trainer.finish()


# --- checkpoints --------------------------------------------------------------------------------------

def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Model, optimiser and step, written to a temporary file and renamed (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def resume_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The step to resume from; an unreadable checkpoint is discarded (with a warning naming it) and the
    run starts over, since a half-finished pretraining is only a shortcut, never a result."""
    try:
        return load_checkpoint(path, model, optimizer)
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same: start over
        warnings.warn(f"partial checkpoint {path} is unreadable ({type(e).__name__}: {e}); discarded, "
                      "training starts from the beginning", stacklevel=2)
        path.unlink(missing_ok=True)
        return 0

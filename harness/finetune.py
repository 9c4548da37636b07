"""The fine-tuning engine: a method's whole life cycle in one trial, written once for both tracks.

A track builds a :class:`harness.tracks.FineTuneSetup` (the model with its head, where adapters may go, a batch source,
the loss, a validation scorer and the final evaluation); the engine does the rest in a fixed order:

    resolved trial -> method context -> wrap -> lr / weight decay -> training loop -> finalize
    -> count -> evaluate -> describe -> save the adapter -> the trial's record

:class:`FineTuneRun` is a trial's one life cycle (start, step, finish; no session or result object
around it): it takes one update per :meth:`FineTuneRun.step`, with the trial's own random state swapped
in (``harness/randomness.py``), so the updates of several trials can be interleaved in one process with
the same results as each alone, and writes its results straight into its ``TrialRecord``.
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import torch
from torch import nn

from harness import adapter_store, placement, provenance
from harness.methods import AdapterSite, Method, MethodContext, get_method
from harness.study_rules import prepare as apply_study_rules
from harness.randomness import TrialRandom, deterministic_kernels
from harness.targets import join_targets
from harness.tracks import FineTuneSetup, Report, get_track
from harness.errors import HarnessError
from harness.training import LoopConfig, Schedule, Trainer, TrainStats, synchronize
from harness.trial import ResolvedTrial, TrialRecord, TrialSpec, print_reporter, resolve_trial


def optimiser_settings(method: Method, settings: dict[str, Any], schedule: Schedule) -> tuple[float, float]:
    """(lr, weight decay): the method's setting, else the method's default (lr only), else the track's."""
    lr = settings.get("lr") or method.default_lr or schedule.lr
    wd = settings.get("weight_decay")
    return float(lr), float(schedule.weight_decay if wd is None else wd)


class MethodHooks:
    """A method's loop hooks bound to its trial context (the loop's one hook signature)."""

    def __init__(self, method: Method, ctx: MethodContext):
        self.method, self.ctx = method, ctx

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.method.extra_loss(model)

    def on_step(self, model: nn.Module, step: int) -> None:
        self.method.on_step(model, step, self.ctx)


# The phases of one trial, in the order they first run; every second of the trial belongs to one of them.
PHASES = ("setup", "wrap", "first_updates", "steady", "interim_eval", "checkpoint", "finalize", "eval", "save")


class PhaseClock:
    """Where one trial's time goes: its wall time split into :data:`PHASES`, from one ``perf_counter``.

    :meth:`mark` gives the time since the previous mark to a phase, so the phases partition the trial's
    time and nothing is counted twice. The training split reuses the trainer's own boundary between the
    warm-up updates and the steady ones (``Trainer._steady_from``, which ``ms_per_update`` leaves out).
    """

    def __init__(self, t0: float | None = None, unix0: float | None = None) -> None:
        """``t0``: the trial's start (``perf_counter``), ``unix0`` the same instant as unix time; default now
        (a trial passes its own start)."""
        self.t0 = self._last = time.perf_counter() if t0 is None else t0
        self.unix0 = time.time() - (time.perf_counter() - self.t0) if unix0 is None else unix0
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.training_span: list[float] = []  # unix [first update's start, last update's end]
        # seconds of named parts inside a phase (the wrap's: the method's wrap, the move to the device, the
        # trainer), reported beside the phases, not in their sum
        self.detail: dict[str, float] = {}

    def mark(self, phase: str, at: float | None = None) -> None:
        """Give ``phase`` the time from the previous mark to ``at`` (a ``perf_counter`` value; default: now)."""
        now = time.perf_counter() if at is None else max(at, self._last)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def as_dict(self) -> dict[str, Any]:
        """``extra.timing`` of the record: seconds per phase (``<phase>_s``) and their sum (``total_s``)."""
        out: dict[str, Any] = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["total_s"] = round(self._last - self.t0, 3)
        if len(self.training_span) == 2:  # a trial that failed in training has no end to it
            out["training_span"] = [round(x, 3) for x in self.training_span]
        if self.detail:
            out["detail"] = {k: round(v, 3) for k, v in self.detail.items()}
        return out


class FineTuneRun:
    """One trial's whole life cycle, advanced update by update: :meth:`start`, :meth:`step` until False,
    :meth:`finish` -> its :class:`~harness.trial.TrialRecord`.

    The one object of a trial (no session around it): it resolves a hand-made :class:`TrialSpec` (a
    :class:`ResolvedTrial` is taken as given), builds the track's setup, wraps the model, trains, finalizes,
    counts, evaluates, saves the adapter and writes its results straight into its record. Its
    :class:`PhaseClock` is the one source of the trial's times, :func:`_memory_mb` of its memory readings.
    An error at any point (or a non-finite loss or score) ends it with a failed record instead of raising,
    so a crash in one trial never ends a sweep."""

    def __init__(self, spec: "ResolvedTrial | TrialSpec", report: Report = print_reporter,
                 clock: PhaseClock | None = None, waited_s: float = 0.0):
        self.started = time.time() if clock is None else clock.unix0
        # seconds the worker waited before the trial on purpose (a staggered start, harness.placement.start_delays):
        # neither the worker's start-up nor the trial's
        self.waited_s = waited_s
        # the trial's clock, started before the imports, the resolution and the track's setup
        self.clock = clock if clock is not None else PhaseClock(unix0=self.started)
        self.spec, self.report = spec, report
        self.record = spec.record() if isinstance(spec, ResolvedTrial) else TrialRecord(
            track=spec.track, benchmark=spec.benchmark, task=spec.task, method=spec.method,
            settings=dict(spec.method_settings), seed=spec.seed, status="ok",
            budget=dict(spec.budget))  # until start() resolves it
        self.record.git_commit = provenance.git_commit()
        self.record.software = dict(provenance.software())
        self.record.date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        self.failed = False
        self._steady_marked = False
        self.setup: FineTuneSetup | None = None
        self.trainer: Trainer | None = None
        self._reserved_sum, self._reserved_n = 0.0, 0
        # MiB allocated and reserved when the trial began: what earlier trials of a reused process left (CUDA
        # graphs a shared compiled loss keeps; BENCHMARKS.md, "The memory column in reused processes"), not
        # this trial's, so the memory columns leave it out; 0 in a fresh process
        self._left_mb = (0.0, 0.0)
        self._close_setup: Callable[[], None] | None = None

    def _fail(self, e: BaseException) -> None:
        """End the trial with a failed record (the traceback kept unless the error explains itself)."""
        self.record.status, self.record.error = "failed", f"{type(e).__name__}: {e}"
        if not isinstance(e, HarnessError):
            self.record.extra = {"traceback": traceback.format_exc(limit=8)}
        self.failed, self.trainer = True, None

    def start(self) -> None:
        """Resolve (a hand-made spec), build the track's setup, wrap the model with the method and make the
        trainer."""
        try:
            if torch.cuda.is_available():  # the trial's peak: from here to its end
                torch.cuda.reset_peak_memory_stats()
            self._left_mb = (_memory_mb("allocated"), _memory_mb("reserved_now"))
            if not isinstance(self.spec, ResolvedTrial):
                self.spec = resolve_trial(self.spec)
                made = self.spec.record()
                self.record.settings, self.record.budget = made.settings, made.budget
                self.record.targets, self.record.alpha_rule = made.targets, made.alpha_rule
            self._start()
        except Exception as e:  # a crash in one trial must not end the sweep
            self._fail(e)

    def _start(self) -> None:
        spec = self.spec
        self.track, self.method = track, method = get_track(spec.track), get_method(spec.method)
        self.settings = spec.method_settings  # resolved once (sweep validation or resolve_trial), as given
        self.rng = TrialRandom(spec.seed)
        with self.rng.scope():
            ts = spec.track_settings
            if ts.deterministic:  # before the first GPU kernel: cuBLAS reads its workspace setting once
                deterministic_kernels()
            setup = track.setup(spec, ts, spec.budget, self.rng, self.report)
            self._close_setup = setup.close  # also where wrapping the model fails below
            self.clock.mark("setup")  # imports, resolution, the track's data and base model
            # The study's targets (fused qkv split where a slice is named) and the LoRA family's alpha rule.
            setup.site, self.wrap_settings = apply_study_rules(method, self.settings, ts, setup.model, setup.site)
            # Adapters on other layers of the same base are no bank for each other.
            self.adapter_key = f"{setup.base_key}|targets={join_targets(setup.site.targets)}"
            self.ctx = MethodContext(
                total_steps=max(1, setup.schedule.steps), seed=spec.seed, init_batches=setup.init_batches,
                forward_fn=setup.forward, layer_inputs_fn=setup.layer_inputs, validate=setup.validate,
                adapter_bank=[str(p) for p in adapter_store.find_bank(self.adapter_key, spec.task, method.builds_on)]
                if method.builds_on and not spec.adapter_bank else list(spec.adapter_bank),
                device=setup.device)
            t_wrap = time.perf_counter()
            model = method.wrap(setup.model, setup.site, self.wrap_settings, self.ctx)
            t_wrapped = time.perf_counter()
            model = model.to(setup.device)
            synchronize(setup.device)  # the copy's time is the move's, not the next phase's
            t_trainer = time.perf_counter()
            self.clock.detail["wrap_method_s"] = t_wrapped - t_wrap
            self.clock.detail["wrap_to_device_s"] = t_trainer - t_wrapped
            self.lr, self.weight_decay = optimiser_settings(method, self.settings, setup.schedule)
            s = setup.schedule
            cfg = LoopConfig(**{f.name: getattr(s, f.name) for f in fields(Schedule)}, compile=setup.compile,
                             compile_mode=setup.compile_mode, time_data=setup.time_data)
            cfg.lr, cfg.weight_decay = self.lr, self.weight_decay  # the trial's rate; the floor follows it
            self.model, self.setup, self.loop = model, setup, cfg
            if setup.device.type == "cuda":  # the training peak: from here to the end of training
                torch.cuda.reset_peak_memory_stats(setup.device)
            if s.steps > 0:
                groups = method.optimizer_groups(model, self.wrap_settings, self.weight_decay)  # LoRA+-like
                self.trainer = Trainer(model, setup.loss, setup.next_batch, cfg, setup.device,
                                       MethodHooks(method, self.ctx), self.report, groups)
            self.clock.detail["wrap_trainer_s"] = time.perf_counter() - t_trainer
        self.clock.mark("wrap")

    def mark_training(self) -> None:
        """Give the time since the last mark to training: to ``first_updates`` up to the update where the
        trainer's steady timing began, to ``steady`` after it. Called when training pauses (an interim
        score, a checkpoint) and when it ends, so the updates themselves carry no clock calls."""
        trainer = self.trainer
        if trainer is None:
            return
        steady_at = trainer._steady_start
        if steady_at is not None and not self._steady_marked:
            self.clock.mark("first_updates", at=steady_at)
            self._steady_marked = True
        self.clock.mark("steady" if self._steady_marked else "first_updates")

    def step(self) -> bool:
        """One training update; False once training is over (or the trial failed)."""
        if self.trainer is None:
            return False
        try:
            with self.rng.scope():
                if not self.clock.training_span:
                    self.clock.training_span = [time.time()]
                more = self.trainer.step()
        except Exception as e:  # a non-finite loss, an error in a method's hook: this trial fails alone
            self._fail(e)
            return False
        if more and self.setup is not None and self.setup.device.type == "cuda":
            # a host-side query of the allocator: no device sync, so it costs the update nothing
            self._reserved_sum += torch.cuda.memory_reserved(self.setup.device)
            self._reserved_n += 1
        return more

    # --- checkpoints and intermediate scores (a trial under Ray Tune: harness/tune_trial.py) -----------
    @property
    def updates_done(self) -> int:
        return self.trainer.step_index if self.trainer is not None else 0

    def trial_state(self) -> dict[str, Any]:
        """Everything a rebuilt run needs to continue from here as if never stopped: the trainer (trainable
        weights, optimiser, update count; the schedule follows from the count), the trial's random
        streams and the method's state outside the model (AdaLoRA's importance scores)."""
        assert self.trainer is not None, "trial_state() of a run without training"
        return {"trainer": self.trainer.state_dict(), "rng": _rng_state(self.rng),
                "method": _method_state(self.model), "reserved": (self._reserved_sum, self._reserved_n)}

    def load_trial_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`trial_state`, right after :meth:`start` rebuilt the run the same way. The
        batch streams are advanced by drawing (and dropping) the batches already trained on, so every
        later batch is the one an uninterrupted run would have drawn; the random streams are restored
        after that, so nothing the redraw did counts."""
        assert self.trainer is not None and self.setup is not None, "load_trial_state() before start()"
        done = int(state["trainer"]["step"])
        with self.rng.scope():
            for _ in range(done):
                self.setup.next_batch()
        self.trainer.load_state_dict(state["trainer"])
        _load_method_state(self.model, state["method"])
        _load_rng_state(self.rng, state["rng"])
        self._reserved_sum, self._reserved_n = state["reserved"]

    def interim_metrics(self) -> dict[str, float]:
        """The model as it is now, scored by the track's final evaluation of this stage (RL: success and
        return on the selection episodes; vision: val200 top-1 in the select stage), without finalizing the
        method and without drawing from the trial's random streams."""
        assert self.setup is not None, "interim_metrics() before start()"
        self.mark_training()
        devices = [self.setup.device] if self.setup.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            metrics, _ = self.setup.evaluate(self.model)
        self.model.train()
        self.clock.mark("interim_eval")
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def finish(self) -> TrialRecord:
        """Finalize, count, evaluate, describe and save, into the trial's record; the record, failed where
        anything failed (a non-finite final metric too)."""
        record = self.record
        if not self.failed and self.setup is not None:
            try:
                self._finish(record)
                record.device_name = provenance.device_name(str(self.setup.device))
                record.extra["placement"] = placement.describe(str(self.setup.device))  # which GPU and cores
            except Exception as e:
                self._fail(e)
        self.close()
        # the whole trial's, evaluation and search included
        record.peak_memory_mb = round(max(0.0, _memory_mb("peak") - self._left_mb[0]), 1)
        self.clock.mark("save")
        record.extra["timing"] = self.timing()
        record.wall_time_s = round(time.time() - self.started, 2)
        record.extra["started_at"] = round(self.started, 3)  # unix time: when trials ran side by side
        return record

    def close(self) -> None:
        """Free what the track's setup holds (its ``close``: RL's rollout workers); safe to call again, and
        called by :meth:`finish` and by whoever ends a trial without it (a scheduler's stop)."""
        close, self._close_setup = self._close_setup, None
        if close is not None:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - a worker that will not stop must not cost the record
                warnings.warn(f"closing the trial's setup failed: {type(e).__name__}: {e}", stacklevel=2)

    def timing(self) -> dict[str, Any]:
        """``extra.timing`` as of now: the :class:`PhaseClock`'s phases, the worker's start-up before the
        trial and, where it waited on purpose before it (``start_delay_s``), that wait."""
        waited = {"start_delay_s": round(self.waited_s, 3)} if self.waited_s else {}
        return {**self.clock.as_dict(), **_process_start(self.started - self.waited_s), **waited}

    def _finish(self, record: TrialRecord) -> None:
        spec, method, setup = self.spec, self.method, self.setup
        assert setup is not None
        with self.rng.scope():
            stats: TrainStats | None = self.trainer.finish() if self.trainer is not None else None
            self.mark_training()  # the finish's wait for queued GPU work is the last updates' time
            if self.clock.training_span:
                self.clock.training_span.append(time.time())
            left, left_reserved = self._left_mb
            train_peak = max(0.0, _memory_mb("peak", setup.device) - left)
            train_reserved = max(0.0, _memory_mb("reserved", setup.device) - left_reserved)
            mean_reserved = (max(0.0, self._reserved_sum / self._reserved_n / 2**20 - left_reserved)
                             if self._reserved_n else 0.0)
            model = method.finalize(self.model, setup.site, self.wrap_settings, self.ctx)
            model.eval()
            own, head = method.count(model, setup.site)
            self.clock.mark("finalize")
            metrics, facts = setup.evaluate(model)
            self.clock.mark("eval")
            metrics = dict(metrics)
            if stats is not None:
                metrics[setup.loss_metric] = float(stats.final_loss)
            self.report({"update": setup.schedule.steps, **metrics})
            describe = method.describe(model)
            adapter_path, adapter_error = "", ""
            if setup.save_adapter:
                try:
                    adapter_path = str(adapter_store.save_trial_adapter(
                        lambda folder: method.save(model, setup.site, self.wrap_settings, folder), spec.to_config(),
                        self.wrap_settings, self.adapter_key))
                except OSError as e:  # a full or read-only disk must not cost the trial its scores
                    adapter_error = f"{type(e).__name__}: {e}"
        extra = {
            **setup.facts, **facts, "lr": self.lr, "weight_decay": self.weight_decay, "warmup": self.loop.warmup,
            "updates": setup.schedule.steps, "train_wall_s": round(stats.wall_s if stats else 0.0, 2),
            "train_steps_per_s": round(stats.steps_per_s, 2) if stats else 0.0,
            "method": describe, "total_wall_s": round(time.time() - self.started, 2),
        }
        if stats is not None and setup.time_data:
            extra["data_share"] = round(stats.data_share, 4)
        if stats is not None and stats.compiled_step:
            extra["compiled_step"] = stats.compiled_step
            extra["graphs_compiled"] = stats.graphs_compiled
            if stats.graphs_compiled > 1:
                warnings.warn(f"{spec.method} on {spec.task} (seed {spec.seed}): its compiled step compiled "
                              f"{stats.graphs_compiled} graphs; something the graph depends on (a batch's shape, a "
                              "Python attribute) changed between updates, and each change cost a compilation "
                              "(extra.graphs_compiled; TORCH_LOGS=recompiles names the cause)", stacklevel=2)
        if adapter_error:
            extra["adapter_error"] = adapter_error
        if any(self._left_mb):
            extra["memory_left_by_earlier_trials_mb"] = {"allocated": round(self._left_mb[0], 1),
                                                         "reserved": round(self._left_mb[1], 1)}
        bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:  # after the adapter is saved, as any finished trial's
            raise HarnessError(f"non-finite final metrics {bad}")
        record.metrics, record.extra = metrics, extra
        record.trainable_params, record.head_params = int(own), int(head)
        record.train_peak_memory_mb, record.train_reserved_memory_mb = round(train_peak, 1), round(train_reserved, 1)
        record.train_mean_reserved_mb = round(mean_reserved, 1)
        record.ms_per_update = round(stats.steady_ms_per_update, 3) if stats else 0.0
        record.adapter_bytes = _checkpoint_bytes(adapter_path)
        record.backbone, record.data_source, record.adapter_path = setup.backbone, setup.data_source, adapter_path


def _memory_mb(kind: str, device: torch.device | None = None) -> float:
    """The one memory reading of a trial, in MiB: the allocator's peak of allocated (``"peak"``) or reserved
    (``"reserved"``) memory since the last reset, or what is allocated (``"allocated"``) or reserved
    (``"reserved_now"``) now, on ``device`` (None: the current CUDA device); 0 off CUDA."""
    if device is None:
        if not torch.cuda.is_available():
            return 0.0
    elif device.type != "cuda":
        return 0.0
    read = {"peak": torch.cuda.max_memory_allocated, "reserved": torch.cuda.max_memory_reserved,
            "allocated": torch.cuda.memory_allocated, "reserved_now": torch.cuda.memory_reserved}[kind]
    return read(device) / 2**20


def _process_start(started: float) -> dict[str, float]:
    """When this trial's process started and how long before ``started`` (the trial's start less any wait on
    purpose): under Ray Tune, a worker's start-up (Python, Ray's own imports, an actor's construction), which
    no phase of the trial sees. Empty where the process's start time cannot be read."""
    try:
        import psutil  # Ray's own dependency

        created = float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - an unreadable start time only loses this figure
        return {}
    return {"process_started_at": round(created, 3), "process_to_trial_s": round(max(0.0, started - created), 3)}


def _rng_state(rng: TrialRandom) -> dict[str, Any]:
    """The trial's own states of torch's global generators (what :meth:`TrialRandom.scope` swaps in)."""
    cuda = rng._cuda_state
    return {"cpu": rng._cpu_state.clone(), "cuda": cuda.clone() if cuda is not None else None}


def _load_rng_state(rng: TrialRandom, state: dict[str, Any]) -> None:
    rng._cpu_state = state["cpu"].clone()
    rng._cuda_state = state["cuda"].clone() if state["cuda"] is not None else None


def _rank_allocators(model: nn.Module) -> list[tuple[str, Any]]:
    """peft's AdaLoRA keeps its importance scores in a RankAllocator beside the model, not in it."""
    return [(name, m.rankallocator) for name, m in model.named_modules() if hasattr(m, "rankallocator")]


def _method_state(model: nn.Module) -> dict[str, Any]:
    """The method's training state that lives outside the model's state_dict."""
    out: dict[str, Any] = {}
    for name, alloc in _rank_allocators(model):
        out[f"rankallocator:{name}"] = {k: {n: t.detach().clone() for n, t in getattr(alloc, k).items()}
                                        for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        pattern = getattr(alloc.peft_config, "rank_pattern", None)
        out[f"rank_pattern:{name}"] = {k: [bool(x) for x in v] for k, v in pattern.items()} if pattern else None
    return out


def _load_method_state(model: nn.Module, state: dict[str, Any]) -> None:
    for name, alloc in _rank_allocators(model):
        for k, tensors in state[f"rankallocator:{name}"].items():
            setattr(alloc, k, dict(tensors))
        pattern = state.get(f"rank_pattern:{name}")
        if pattern is not None:
            alloc.peft_config.rank_pattern = pattern


def _checkpoint_bytes(adapter_path: str) -> int:
    """Bytes of the adapter's tensors on disk (its ``*.safetensors`` files; the settings and the cache's
    manifest are bookkeeping, not checkpoint)."""
    from pathlib import Path

    if not adapter_path:
        return 0
    return sum(f.stat().st_size for f in Path(adapter_path).glob("*.safetensors"))


def run_trial(spec: "ResolvedTrial | TrialSpec", report: Report = print_reporter) -> TrialRecord:
    """Run one trial to its record outside Ray (the command line's ``run``, tests): a raised error or a
    non-finite loss becomes a failed record. It lives with the engine, not with the trial's types, so that
    ``harness.trial`` (imported by the driver and the sweep file, without torch) never imports the engine."""
    run = FineTuneRun(spec, report)
    run.start()
    while run.step():
        pass
    return run.finish()

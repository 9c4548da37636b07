"""One trial, one interface for both tracks.

(track, benchmark, task, method, method settings, seed, budget, track settings) go in as a
:class:`TrialSpec`; a flat :class:`TrialRecord` of metrics comes out. The sweep driver and the command
line call :func:`run_trial` and know nothing track-specific: each track is a module exposing

    BENCHMARKS: dict[str, list[str]]                 benchmark -> task names (in the papers' order)
    GROUPS: dict[str, dict[str, list[str]]]           benchmark -> group -> tasks (may be empty)
    DEFAULTS: dict[str, Any]                          default track settings (model size, data, ...)
    BUDGET: dict[str, Any]                            default budget (steps, eval episodes, stage, ...)
    PRIMARY_METRIC: str                               the metric the leaderboard ranks by
    DATA_SOURCE(track_settings) -> str                "real" or "synthetic"
    prepare(track_settings, benchmark, tasks, report) build cached data / pretrained models once,
                                                      before trials start (the driver calls it)
    run(spec: TrialSpec, report: Reporter) -> TrialResult

The budget key ``stage`` is "select" (train on the training split, score on validation) or "final"
(train on train+val, score on test); a track without such a split treats both alike.

registered by import path in :data:`TRACKS`.
"""

from __future__ import annotations

import importlib
import json
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from types import ModuleType
from typing import Any, Protocol

from harness import __version__
from harness.errors import ConfigError, HarnessError, choices_message

TRACKS: dict[str, str] = {"rl": "agents.trial", "vision": "vision.trial"}


class Reporter(Protocol):
    """Receives intermediate progress (update, loss, ...) and shows it (Ray Tune, console)."""

    def __call__(self, metrics: dict[str, Any]) -> None: ...


def print_reporter(metrics: dict[str, Any]) -> None:
    """Console progress for trials run without Ray."""
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[trial] {shown}", flush=True)


@dataclass(frozen=True)
class TrialSpec:
    """Everything that defines one trial."""

    track: str
    benchmark: str
    task: str
    method: str
    method_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    budget: dict[str, Any] = field(default_factory=dict)
    track_settings: dict[str, Any] = field(default_factory=dict)

    def trial_id(self) -> str:
        from harness.cache import settings_hash

        return settings_hash(asdict(self))[:10]


@dataclass
class TrialResult:
    """What a track's ``run`` returns: final metrics plus bookkeeping."""

    metrics: dict[str, float]
    trainable_params: int
    head_params: int = 0
    backbone: str = ""
    data_source: str = "real"  # "real" or "synthetic"
    adapter_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialRecord:
    """The flat record of one finished (or failed) trial, one row of the results table."""

    track: str
    benchmark: str
    task: str
    method: str
    settings: str  # JSON of the method settings
    seed: int
    status: str  # "ok" or "failed"
    error: str = ""
    trainable_params: int = 0
    head_params: int = 0
    peak_memory_mb: float = 0.0
    wall_time_s: float = 0.0
    backbone: str = ""
    data_source: str = ""
    adapter_path: str = ""
    harness_version: str = __version__
    date: str = ""
    budget: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """One level dict: metrics become top-level columns, extra goes in as JSON."""
        d = asdict(self)
        metrics = d.pop("metrics")
        extra = d.pop("extra")
        d.update(metrics)
        d["extra"] = json.dumps(extra, default=str, sort_keys=True)
        return d


def track_module(track: str) -> ModuleType:
    """Import a track's module, or fail naming the valid tracks."""
    if track not in TRACKS:
        raise ConfigError(choices_message("track", track, list(TRACKS)))
    return importlib.import_module(TRACKS[track])


def validate_spec(spec: TrialSpec) -> None:
    """Check track, benchmark, task and method names before any compute."""
    from harness.methods import get_method

    mod = track_module(spec.track)
    if spec.benchmark not in mod.BENCHMARKS:
        raise ConfigError(choices_message(f"{spec.track} benchmark", spec.benchmark, list(mod.BENCHMARKS)))
    tasks = mod.BENCHMARKS[spec.benchmark]
    if spec.task not in tasks:
        raise ConfigError(choices_message(f"task of {spec.benchmark}", spec.task, tasks))
    get_method(spec.method).resolve_settings(spec.method_settings)
    unknown = set(spec.track_settings) - set(mod.DEFAULTS)
    if unknown:
        raise ConfigError(
            f"unknown {spec.track} setting(s) {sorted(unknown)}; valid: {', '.join(sorted(mod.DEFAULTS))}")


def _peak_memory_mb() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # pragma: no cover - torch always present in practice
        pass
    return 0.0


def run_trial(spec: TrialSpec, report: Reporter = print_reporter) -> TrialRecord:
    """Run one trial; a raised error or a non-finite loss becomes a failed record, never a crash."""
    started = time.time()
    record = TrialRecord(
        track=spec.track, benchmark=spec.benchmark, task=spec.task, method=spec.method,
        settings=json.dumps(spec.method_settings, sort_keys=True), seed=spec.seed, status="ok",
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), budget=json.dumps(spec.budget, sort_keys=True),
    )
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        validate_spec(spec)
        result: TrialResult = track_module(spec.track).run(spec, report)
        bad = {k: v for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise HarnessError(f"non-finite final metrics {bad}")
        record.metrics = dict(result.metrics)
        record.trainable_params = int(result.trainable_params)
        record.head_params = int(result.head_params)
        record.backbone = result.backbone
        record.data_source = result.data_source
        record.adapter_path = result.adapter_path
        record.extra = dict(result.extra)
    except HarnessError as e:
        record.status, record.error = "failed", f"{type(e).__name__}: {e}"
    except Exception as e:  # a crash in one trial must not end the sweep
        record.status = "failed"
        record.error = f"{type(e).__name__}: {e}"
        record.extra = {"traceback": traceback.format_exc(limit=8)}
    record.peak_memory_mb = round(_peak_memory_mb(), 1)
    record.wall_time_s = round(time.time() - started, 2)
    return record


def resolve_budget(defaults: dict[str, Any], budget: dict[str, Any], where: str) -> dict[str, Any]:
    """Merge a budget over a track's defaults, refusing unknown keys."""
    unknown = set(budget) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown budget key(s) {sorted(unknown)} for {where}; valid: {', '.join(sorted(defaults))}")
    return {**defaults, **budget}


"""One trial, one interface for both tracks.

(track, benchmark, task, method, method settings, seed, budget, track settings) go in as a
:class:`TrialSpec`, resolved once into a :class:`ResolvedTrial`; a flat :class:`TrialRecord` of metrics
comes out, with what made it (package versions, git commit, device). This module holds what a trial is
and what it leaves (no torch): the sweep driver and the command line know nothing track-specific, the
track (``harness/tracks.py``) builds the trial's model and data, and the engine (``harness/finetune.py``:
``FineTuneRun``, the trial's one life cycle, and :func:`harness.finetune.run_trial`, which runs one to its
record) runs the method and fills in the record. A raised error or a non-finite loss becomes a failed record,
never a crash of the sweep.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from harness import __version__
from harness.methods import get_method
from harness.tracks import get_track

if TYPE_CHECKING:
    from harness.tracks import TrackBudget, TrackSettings


class Reporter(Protocol):
    """Receives intermediate progress (update, loss, ...) and shows it (Ray Tune, console)."""

    def __call__(self, metrics: dict[str, Any]) -> None: ...


def print_reporter(metrics: dict[str, Any]) -> None:
    """Console progress for trials run without Ray."""
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[trial] {shown}", flush=True)


@dataclass(frozen=True)
class TrialSpec:
    """One trial as asked for (raw settings, budget and track settings): what a user or a test writes.
    :func:`resolve_trial` turns it into the :class:`ResolvedTrial` everything else takes."""

    track: str
    benchmark: str
    task: str
    method: str
    method_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    budget: dict[str, Any] = field(default_factory=dict)
    track_settings: dict[str, Any] = field(default_factory=dict)
    # EigenLoRA's bank as the sweep driver chose it (one LoRA adapter folder per other task); empty: the
    # method's bank_dir setting, else the cache's adapters (harness.adapter_store.find_bank)
    adapter_bank: tuple[str, ...] = ()


@dataclass
class TrialRecord:
    """The record of one finished (or failed) trial: the one result type from the engine
    (``FineTuneRun.finish``) to the leaderboard, with typed fields (the settings, budget and package versions
    are mappings, not JSON text). It crosses from a Ray worker to the driver as one JSON document
    (:meth:`to_json` -> :meth:`from_json`, the one serialisation Ray needs) and becomes one row of the
    results table, the leaderboard's file format, in :meth:`flat` (there, and only there, ``settings``,
    ``budget``, ``software`` and ``extra`` are JSON text in their columns)."""

    track: str
    benchmark: str
    task: str
    method: str
    settings: dict[str, Any]  # the method's resolved settings (defaults filled in)
    seed: int
    status: str  # "ok" or "failed"
    error: str = ""
    targets: str = ""  # the adapted layers, comma-joined as the study gave them ("" for full and linear)
    alpha_rule: str = ""  # the LoRA family's scale: "alpha=1", "alpha=r", "alpha=2r" or "alpha=<v> (set)"
    trainable_params: int = 0
    head_params: int = 0
    peak_memory_mb: float = 0.0  # the whole trial's peak (evaluation and the method's search included)
    wall_time_s: float = 0.0  # the whole trial (data, training, evaluation, saving)
    train_peak_memory_mb: float = 0.0  # training alone: what the method costs
    ms_per_update: float = 0.0  # training alone, per optimiser update
    train_reserved_memory_mb: float = 0.0  # training alone: the allocator's reserved peak
    train_mean_reserved_mb: float = 0.0  # training alone: reserved memory, mean over updates
    adapter_bytes: int = 0  # the saved adapter's tensors on disk
    backbone: str = ""
    data_source: str = ""
    adapter_path: str = ""
    harness_version: str = __version__
    git_commit: str = ""
    device_name: str = ""
    software: dict[str, str] = field(default_factory=dict)  # versions of torch, peft, timm, ray, metaworld, ...
    date: str = ""
    budget: dict[str, Any] = field(default_factory=dict)  # the trial's resolved budget
    # how the row's settings were chosen, set by the sweep driver: "held-out" (select-then-final: on
    # validation data or episodes apart from the reported ones), "on-reported" (the best grid point on the
    # reported metric itself, EVA Table 4's convention), "single-point" (a grid of one: nothing chosen)
    selection: str = ""
    grid_size: int = 0  # grid points the settings were chosen from
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a record read back from an older results folder (--resume) carries these as JSON text
        for name in _JSON_COLUMNS:
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, json.loads(value) if value else {})

    def flat(self) -> dict[str, Any]:
        """The record as one row of the results table (the leaderboard's file format): metrics become
        top-level columns; settings, budget, software and extra are JSON text (keys sorted, so equal
        settings are equal text: the driver groups trials by it)."""
        d = asdict(self)
        metrics, extra = d.pop("metrics"), d.pop("extra")
        for name in ("settings", "budget", "software"):
            # an unset budget or software (a trial that never ran) is an empty cell, as it always was
            d[name] = json.dumps(d[name], default=str, sort_keys=True) if d[name] or name == "settings" else ""
        d.update(metrics)
        d["extra"] = json.dumps(extra, default=str, sort_keys=True)
        return d

    def to_json(self) -> str:
        """The whole record as one JSON document (nested, nothing encoded twice): what a Ray worker reports."""
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> "TrialRecord":
        """The record :meth:`to_json` wrote; a row (:meth:`flat`, what a worker of an older version reported
        into an experiment that is now resumed) is read as :meth:`from_row` does."""
        data = json.loads(text)
        if "metrics" not in data:
            return cls.from_row(data)
        known = {f.name for f in fields(cls)}
        unknown = {k: data.pop(k) for k in list(data) if k not in known}
        record = cls(**data)
        if unknown:  # a newer writer's fields: kept, not lost or refused
            record.extra = {**record.extra, "unknown_fields": unknown}
        return record

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TrialRecord":
        """The record of a results-table row (:meth:`flat`'s inverse): the record's own columns are its
        fields, every other column is a metric."""
        known = {f.name for f in fields(cls)} - {"metrics"}
        return cls(**{k: v for k, v in row.items() if k in known},
                   metrics={k: v for k, v in row.items() if k not in known})


# the record's fields that are mappings in the record and JSON text in a row of the results table
_JSON_COLUMNS = ("settings", "budget", "software", "extra")


# The record's (and a board's) fields that measure how a trial ran, not what it computed: memory, times, and
# where and when it ran. Two runs of the same trial may differ in these and still have the same result; every
# other field (scores, parameter counts, settings, what was adapted) defines the result. Boards carry them
# under the same names (harness/leaderboard.py); ``*_mean``/``*_se`` of a measurement are measurements too.
MEASUREMENT_FIELDS = ("peak_memory_mb", "wall_time_s", "train_peak_memory_mb", "ms_per_update",
                      "train_reserved_memory_mb", "train_mean_reserved_mb", "harness_version", "git_commit",
                      "device_name", "software", "date")


def is_measurement(column: str) -> bool:
    """Whether a record's or a board's ``column`` is a measurement (:data:`MEASUREMENT_FIELDS`)."""
    for suffix in ("_mean", "_se"):
        if column.endswith(suffix) and column[: -len(suffix)] in MEASUREMENT_FIELDS:
            return True
    return column in MEASUREMENT_FIELDS


def resolve_point(method: Any, point: dict[str, Any] | None) -> dict[str, Any]:
    """A method's settings at one grid point: defaults filled in, every key and value checked (ConfigError).

    The one place the harness resolves a method's settings: sweep validation resolves each grid point once
    through it (``harness.sweep_file.resolved_grid``), :func:`resolve_trial` does for a trial made by hand
    (``python -m harness run``, a selection's chosen point), and the tools that count or time methods
    outside a trial do. Everything downstream takes the :class:`ResolvedTrial` as given."""
    return method.resolve_settings(point)


@dataclass(frozen=True)
class ResolvedTrial:
    """One trial, resolved and checked: what the driver, the trial, the engine and the track take as given.

    Made once, by sweep validation (``harness.sweep_file.study_trials``) or by :func:`resolve_trial` for a
    trial made by hand; crosses to a Ray worker as :meth:`to_config` (plain JSON) and back with
    :meth:`from_config`, which rebuilds the typed models without resolving anything again."""

    track: str
    benchmark: str
    task: str
    method: str
    method_settings: dict[str, Any]  # the method's settings, defaults filled in (resolve_point)
    seed: int
    budget: "TrackBudget"  # the track's Budget model, defaults filled in
    track_settings: "TrackSettings"  # the track's Settings model, defaults filled in
    targets: str = ""  # the adapted layers as the study gave them ("" where the track's site decides)
    alpha_rule: str = ""  # the LoRA family's scale as recorded ("" outside it)
    # EigenLoRA's bank as the sweep driver chose it (one LoRA adapter folder per other task); empty: the
    # method's bank_dir setting, else the cache's adapters (harness.adapter_store.find_bank)
    adapter_bank: tuple[str, ...] = ()

    def to_config(self) -> dict[str, Any]:
        """Plain JSON values, for Ray Tune's config and the adapter cache's key (the one serialisation).
        The track's models keep only the keys the study set (their defaults come back in
        :meth:`from_config`): Tune copies the config into every result row and progress table."""
        return {"track": self.track, "benchmark": self.benchmark, "task": self.task, "method": self.method,
                "method_settings": json.loads(json.dumps(self.method_settings, default=str)), "seed": self.seed,
                "budget": self.budget.model_dump(mode="json", exclude_unset=True),
                "track_settings": self.track_settings.model_dump(mode="json", exclude_unset=True),
                "targets": self.targets, "alpha_rule": self.alpha_rule, "adapter_bank": list(self.adapter_bank)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ResolvedTrial":
        """The trial :meth:`to_config` wrote (in a Ray worker): the typed models rebuilt from their dumps."""
        track = get_track(config["track"])
        return cls(config["track"], config["benchmark"], config["task"], config["method"],
                   dict(config["method_settings"]), int(config["seed"]), track.Budget.model_validate(config["budget"]),
                   track.Settings.model_validate(config["track_settings"]), config.get("targets", ""),
                   config.get("alpha_rule", ""), tuple(config.get("adapter_bank", ())))

    def record(self) -> "TrialRecord":
        """The record this trial starts from (status ok, no results yet); what a trial that never ran
        reports too, with its status and error set."""
        return TrialRecord(track=self.track, benchmark=self.benchmark, task=self.task, method=self.method,
                           settings=dict(self.method_settings), seed=self.seed, status="ok", targets=self.targets,
                           alpha_rule=self.alpha_rule, budget=self.budget.model_dump(mode="json"))


def resolve_trial(spec: TrialSpec, *, settings: dict[str, Any] | None = None, track_settings: Any = None,
                  budget: Any = None, check_fit: bool = True) -> ResolvedTrial:
    """Check every part of a trial before any compute and resolve it (defaults filled in), so equal trials
    are equal objects. ``settings``, ``track_settings``, ``budget``: parts a sweep's validation already
    resolved for the whole study (then not resolved again); ``check_fit``: check the method's settings
    against the track's model shapes (a sweep did so per grid point)."""
    from harness.study_rules import check_fit as fit, describe  # heavy: harness.study_rules imports torch

    track = get_track(spec.track)
    track.check_tasks(spec.benchmark, [spec.task])
    method = get_method(spec.method)
    settings = resolve_point(method, spec.method_settings) if settings is None else settings
    ts = track.settings(spec.track_settings) if track_settings is None else track_settings
    if check_fit:
        shaped = track.shape_model(ts, spec.benchmark)
        if shaped is not None:
            fit(method, settings, ts, shaped)
    resolved_budget = track.budget(spec.budget) if budget is None else budget
    facts = describe(method, settings, ts)
    return ResolvedTrial(spec.track, spec.benchmark, spec.task, spec.method, dict(settings), int(spec.seed),
                         resolved_budget, ts, facts.targets, facts.alpha_rule, tuple(spec.adapter_bank))


def as_resolved(spec: "TrialSpec | ResolvedTrial") -> ResolvedTrial:
    """``spec`` as a resolved trial: as given when it is one, else through :func:`resolve_trial`."""
    return spec if isinstance(spec, ResolvedTrial) else resolve_trial(spec)


def spec_key(config: dict[str, Any]) -> str:
    """A trial's identity as one string, from its :meth:`ResolvedTrial.to_config` (as Tune's config holds
    it): the JSON with sorted keys."""
    return json.dumps(config, sort_keys=True, default=str)


__all__ = ["MEASUREMENT_FIELDS", "Reporter", "ResolvedTrial", "TrialRecord", "TrialSpec",
           "as_resolved", "is_measurement", "print_reporter", "resolve_point", "resolve_trial", "spec_key"]

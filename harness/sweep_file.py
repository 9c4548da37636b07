"""Sweep files: the YAML schema, its full validation before any compute, and the expansion into trials.

A sweep file names one study (track, benchmark, tasks, methods with their search spaces, seeds, budget,
track settings, resources) at its top level, or several under ``studies:`` (the quickstart has an RL and
a vision study). A list in a method's settings is a grid axis; a scalar is fixed. Every error names the
key, the bad value and the valid choices.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError,
                      field_validator, model_validator)

from harness.early_stopping import parse_scheduler
from harness.errors import ConfigError
from harness.methods import base_name, get_method
from harness.plugins import MODULE_PATTERN, load_plugins
from harness.tracks import get_track
from harness.trial import ResolvedTrial, TrialSpec, resolve_point, resolve_trial
from harness.validation import format_errors
from harness.yaml_input import load_yaml

MAX_SEED = 2**31 - 1  # seeds feed numpy, torch and the environments; larger ones overflow some of them

class Resources(BaseModel):
    """Per-trial resources and concurrency; fractional GPUs let several small trials share one GPU."""

    model_config = ConfigDict(extra="forbid")
    cpus_per_trial: float = Field(1.0, gt=0)
    # auto: per wave, 1 / ceil(trials / GPUs), at most 4 trials per GPU (placement.auto_gpu_share); 0 without GPUs
    gpus_per_trial: float | Literal["auto"] = "auto"
    max_concurrent: int | None = Field(None, ge=1)
    # Under a sweep, each trial saves a Tune checkpoint this often (harness/tune_trial.py), so a retried
    # or resumed trial continues from it: every checkpoint_every updates, else every checkpoint_minutes
    # of training (0: never)
    checkpoint_every: int | None = Field(None, ge=1)
    checkpoint_minutes: float = Field(5.0, ge=0)
    # where trials share a GPU, a wave's first trials on it start this many seconds apart, so that they do not
    # evaluate and save all at once while the GPU waits (harness.placement.start_delays; 0: together, the
    # default, since on the H200 staggering gained nothing: BENCHMARKS.md, 2026-12-04); auto:
    # harness.placement.AUTO_START_STAGGER_S
    start_stagger_s: Annotated[float, Field(ge=0)] | Literal["auto"] = 0.0


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _distinct(values: list[Any], what: str) -> list[Any]:
    """Each value once: a repeated seed or task would run twice and count twice in a row's mean."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{what} must be distinct; repeated: {', '.join(repeated)}")
    return values


class Selection(BaseModel):
    """select-then-final protocol: settings chosen on the validation split, then final runs on test."""

    # extra keys are the scheduler's Tune parameters (grace_period, reduction_factor, ...), checked by
    # harness.early_stopping.parse_scheduler, which refuses any other key
    model_config = ConfigDict(extra="allow")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    budget: dict[str, Any] = Field(default_factory=dict)
    # early stopping of the selection grid through Ray Tune: asha, sha or median (harness/early_stopping.py)
    scheduler: str | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        return _distinct(v, "seeds")

    @model_validator(mode="after")
    def _known_scheduler(self) -> "Selection":
        try:
            parse_scheduler(self.scheduler_settings())
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def scheduler_settings(self) -> dict[str, Any]:
        """``scheduler`` and its Tune parameters, as the study gave them."""
        return {"scheduler": self.scheduler, **(self.model_extra or {})}


# Names become folder and file names under --results and --leaderboard: nothing that could leave them.
SafeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SafeName
    track: str
    benchmark: str
    tasks: Annotated[list[str], Field(min_length=1)] | Literal["all"] = "all"
    methods: dict[str, dict[str, Any]]
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    budget: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    # grid: every grid point runs once, scored on the reported split/episodes; the leaderboard shows the best
    # (EVA Table 4's convention; "best-on-reported" names it explicitly, rows labelled on-reported).
    # select-then-final: chosen on held-out data or episodes, then final runs scored apart.
    protocol: Literal["grid", "best-on-reported", "select-then-final"] = "grid"
    selection: Selection = Field(default_factory=Selection)
    resources: Resources = Field(default_factory=Resources)
    leaderboard: SafeName | None = None  # CSV name; default: the benchmark
    # what validation resolved, kept so nothing downstream resolves it again: each method's grid points
    # (resolved_grid) and the track settings (track_settings)
    _grids: dict[str, list[dict[str, Any]]] = PrivateAttr(default_factory=dict)
    _track_settings: Any = PrivateAttr(default=None)

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, v: dict) -> dict:
        if not v:
            raise ValueError("name at least one method")
        return {k: (dict(s) if s else {}) for k, s in v.items()}

    @field_validator("leaderboard")
    @classmethod
    def _board_name(cls, v: str | None) -> str | None:
        # heavy: harness.leaderboard imports pandas (it holds the one rule for names the site keeps for itself)
        from harness.leaderboard import board_name_problem

        problem = board_name_problem(v) if v else None
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        return _distinct(v, "seeds")

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, v: list[str] | str) -> list[str] | str:
        return _distinct(v, "tasks") if isinstance(v, list) else v

    @model_validator(mode="after")
    def _room_for_paused_trials(self) -> "Study":
        if self.selection.scheduler == "sha" and self.resources.max_concurrent is not None:
            raise ValueError(f"resources.max_concurrent={self.resources.max_concurrent} with selection.scheduler "
                             "'sha': Tune counts a trial paused at a rung against max_concurrent, so the rung "
                             "would wait for trials that never start. Remove resources.max_concurrent "
                             "(cpus_per_trial and gpus_per_trial bound how many trials run at once)")
        return self

    @property
    def board_name(self) -> str:
        return self.leaderboard or self.benchmark


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SafeName
    description: str = ""
    studies: list[Study]
    # Ray Tune's tracking integrations for the whole sweep (harness/experiment_logging.py): local and offline by default
    tracking: list[Literal["mlflow", "wandb"]] = Field(default_factory=list)
    # modules imported before the file is checked and in every Ray worker: methods and tracks from outside
    # the project (harness/plugins.py)
    plugins: list[Annotated[str, StringConstraints(pattern=MODULE_PATTERN)]] = Field(default_factory=list)




def _normalise(raw: Any, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep file is a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw)
    if "studies" not in raw:  # a single-study file: every key but the sweep's own belongs to the study
        study = {k: raw.pop(k) for k in list(raw) if k not in ("name", "description", "tracking", "plugins")}
        study["name"] = raw.get("name", "main")
        raw["studies"] = [study]
        raw["_single"] = True
    raw.setdefault("name", Path(source).stem)
    return raw


def _pydantic_message(e: ValidationError, source: str, single: bool) -> str:
    if single:
        models = {(): Study, ("resources",): Resources, ("selection",): Selection}
        return format_errors(e, f"{source}: invalid sweep file", "key", Study, models, drop_prefix=("studies", 0))
    models = {(): SweepFile, ("studies",): Study, ("studies", "resources"): Resources,
              ("studies", "selection"): Selection}
    return format_errors(e, f"{source}: invalid sweep file", "key", SweepFile, models)


def _grid_axes(settings: dict[str, Any], method: str | None) -> dict[str, list[Any]]:
    """Each setting's values: a list is a grid axis, a scalar one value. A setting whose value is itself a
    list (GLoRA's ``ranks``) is a grid axis only as a list of lists: ``ranks: [8, 4]`` is one value,
    ``ranks: [[8, 4], [2]]`` two."""
    list_valued: set[str] = set()
    if method is not None:
        list_valued = {k for k, s in get_method(method).all_settings().items() if isinstance(s.default, (list, tuple))}
    axes = {}
    for k, v in settings.items():
        if k in list_valued:
            axes[k] = v if isinstance(v, list) and v and all(isinstance(x, list) for x in v) else [v]
        else:
            axes[k] = v if isinstance(v, list) else [v]
    return axes


def expand_grid(settings: dict[str, Any], method: str | None = None) -> list[dict[str, Any]]:
    """All combinations of a method's settings, lists being grid axes (see :func:`_grid_axes`)."""
    axes = _grid_axes(settings, method)
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def grid_size(settings: dict[str, Any], method: str | None = None) -> int:
    """How many points :func:`expand_grid` gives, without making them."""
    return math.prod(len(v) for v in _grid_axes(settings, method).values())


def resolved_grid(study: Study, method: str) -> list[dict[str, Any]]:
    """The method's grid points of the study, each resolved (defaults filled in, checked) once: the list
    :func:`expand_grid` gives, in its order. A bad point raises the method's ConfigError."""
    if method not in study._grids:
        m = get_method(method)
        study._grids[method] = [resolve_point(m, combo) for combo in expand_grid(study.methods[method], method)]
    return study._grids[method]


def track_settings(study: Study, where: str = "") -> Any:
    """The study's track settings as its track's Settings model, validated once."""
    if study._track_settings is None:
        study._track_settings = get_track(study.track).settings(study.settings, where or f"{study.name}.settings")
    return study._track_settings


def selection_methods(study: Study) -> list[str]:
    """The methods whose select-then-final selection stage runs: a grid of more than one point, or a
    method that chooses something inside its trial (``Method.needs_selection``), and the methods that
    those build on (EigenLoRA's selection trials need LoRA's adapters of the same stage). A method with
    one grid point and nothing to choose goes straight to its final runs."""
    if study.protocol != "select-then-final":
        return []
    picked = {m for m, space in study.methods.items()
              if grid_size(space, m) > 1
              or any(get_method(m).needs_selection(g) for g in resolved_grid(study, m))}
    for m in list(picked):
        picked |= {d for d in study.methods if base_name(d) in get_method(m).builds_on}
    return [m for m in study.methods if m in picked]


def method_waves(methods: list[str]) -> list[list[str]]:
    """Methods grouped into waves: a method runs one wave after the latest of the methods it builds on
    (``Method.builds_on``) that are in the same study; the rest run in the first wave."""
    depth: dict[str, int] = {}

    def wave(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in seen:
            raise ConfigError(f"methods {' -> '.join(seen + (name,))} build on each other in a cycle")
        if name not in depth:
            deps = [d for d in methods if base_name(d) in get_method(name).builds_on]
            depth[name] = 1 + max(wave(d, seen + (name,)) for d in deps) if deps else 0
        return depth[name]

    waves: list[list[str]] = [[] for _ in range(1 + max((wave(m) for m in methods), default=0))]
    for m in methods:
        waves[wave(m)].append(m)
    return waves


LARGE_SWEEP = 10_000  # trials; above it a sweep runs only when the user confirms (``sweep --yes``)


def count_trials(study: Study) -> int:
    """The trials a study runs: under select-then-final the selection grid on the selection seeds (for
    :func:`selection_methods`) plus one final setting per method and task on every seed; otherwise the
    grid on every seed."""
    tasks = len(study_tasks(study))
    sizes = {m: grid_size(space, m) for m, space in study.methods.items()}
    if study.protocol != "select-then-final":
        return sum(sizes.values()) * tasks * len(study.seeds)
    selecting = sum(sizes[m] for m in selection_methods(study))
    return selecting * tasks * len(study.selection.seeds) + len(sizes) * tasks * len(study.seeds)


def study_tasks(study: Study) -> list[str]:
    benchmark = get_track(study.track).benchmark(study.benchmark)
    if study.tasks == "all" and benchmark.task_pattern is not None:
        raise ConfigError(f"study {study.name!r}: benchmark {study.benchmark!r} has no fixed task list (its tasks "
                          "are found on disk, e.g. folders under data_root): name them under tasks")
    return list(benchmark.tasks) if study.tasks == "all" else list(study.tasks)


def _check_names(study: Study, where: str) -> None:
    """The study's benchmark, tasks and method names (cheap: nothing is built)."""
    track = get_track(study.track)
    try:
        track.benchmark(study.benchmark)
    except ConfigError as e:
        raise ConfigError(f"{where}.benchmark: {e}") from None
    try:
        track.check_tasks(study.benchmark, study_tasks(study))
    except ConfigError as e:
        raise ConfigError(f"{where}.tasks: {e}") from None
    for name in study.methods:
        try:
            get_method(name)
        except ConfigError as e:
            raise ConfigError(f"{where}.methods.{name}: {e}") from None


def check_size(sweep: SweepFile, confirmed: bool) -> None:
    """A sweep past :data:`LARGE_SWEEP` trials states its count and runs only when confirmed: a stray list
    in a grid multiplies it, and Ray would start on it without a word."""
    counts = {s.name: count_trials(s) for s in sweep.studies}
    total = sum(counts.values())
    if total > LARGE_SWEEP and not confirmed:
        per = ", ".join(f"{n}: {c:,}" for n, c in counts.items())
        raise ConfigError(f"sweep {sweep.name!r} has {total:,} trials ({per}), more than {LARGE_SWEEP:,}: check "
                          "its grids (every list in a method's settings is a grid axis), then pass --yes to run it")


def validate_study(study: Study, where: str) -> None:
    """Everything the track and the method registry can check, once, before any compute: names, track
    settings, budgets (both stages) and every grid point of every method."""
    _check_names(study, where)
    track = get_track(study.track)
    settings = track_settings(study, f"{where}.settings")
    shaped = track.shape_model(settings, study.benchmark)
    for name in study.methods:
        try:
            method = get_method(name)
            for resolved in resolved_grid(study, name):
                if shaped is not None:  # on the model a trial would wrap: targets split, alpha rule applied
                    from harness.study_rules import check_fit  # heavy: harness.study_rules imports torch

                    check_fit(method, resolved, settings, shaped)
        except ConfigError as e:
            raise ConfigError(f"{where}.methods.{name}: {e}") from None
    track.budget(study.budget, f"{where}.budget")
    track.budget({**study.budget, **study.selection.budget}, f"{where}.selection.budget")
    if study.selection.scheduler and study.protocol != "select-then-final":
        raise ConfigError(f"{where}.selection.scheduler={study.selection.scheduler!r}: only protocol "
                          f"'select-then-final' has a selection stage to stop early (protocol is "
                          f"{study.protocol!r}); set protocol: select-then-final, or drop the scheduler")


def load_sweep(path: str | Path, overrides: list[str] | None = None, only: str | None = None,
               confirmed: bool = False) -> SweepFile:
    """Read, override (``--set key=value``) and validate a sweep file in full; with ``only``, just that
    study: bare overrides apply to it alone and the other studies are neither changed nor checked. A sweep
    of more than :data:`LARGE_SWEEP` trials is refused unless ``confirmed`` (``sweep --yes``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist" + _available_sweeps())
    raw = load_yaml(path.read_text(encoding="utf-8-sig"), str(path))
    raw = _normalise(raw, str(path))
    single = raw.pop("_single", False)
    if only is not None:
        names = [s.get("name") if isinstance(s, dict) else None for s in raw["studies"]]
        if only not in names:
            raise ConfigError(f"--only {only!r}: no such study in {path}; studies: {', '.join(map(str, names))}")
    for item in overrides or []:
        apply_override(raw, item, only)
    if only is not None:
        raw["studies"] = [s for s in raw["studies"] if isinstance(s, dict) and s.get("name") == only]
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_pydantic_message(e, str(path), single)) from None

    load_plugins(sweep.plugins, f"{path}: plugins")  # their methods and tracks are checked like the project's
    names = [s.name for s in sweep.studies]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: study names must be unique, got {names}")
    wheres = [str(path) if single else f"{path}: studies[{i}] ({study.name})" for i, study in enumerate(sweep.studies)]
    for study, where in zip(sweep.studies, wheres):
        _check_names(study, where)
    check_size(sweep, confirmed)  # before every grid point is checked: that is what a huge grid makes slow
    for study, where in zip(sweep.studies, wheres):
        validate_study(study, where)
    return sweep


def _available_sweeps() -> str:
    root = Path("sweeps")
    files = sorted(p.name for p in root.glob("*.yaml")) if root.is_dir() else []
    return f"; sweep files in ./sweeps: {', '.join(files)}" if files else ""


def apply_override(raw: dict[str, Any], item: str, only: str | None = None) -> None:
    """``key.sub=value`` (value parsed as YAML). A key without ``studies.`` applies to every study (to
    study ``only`` alone when given); ``studies.N.key`` to the N-th study of the file."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. budget.steps=100")
    key, value = item.split("=", 1)
    parsed = load_yaml(value, f"--set {item!r}")
    parts = key.strip().split(".")
    if parts[0] in ("name", "description", "studies", "tracking", "plugins"):
        targets = [raw]
    else:
        targets = [s for s in raw["studies"] if only is None or (isinstance(s, dict) and s.get("name") == only)]
    for target in targets:
        node: Any = target
        for i, p in enumerate(parts[:-1]):
            where = ".".join(parts[:i + 1])
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"--set {item!r}: {where!r} needs an index 0..{len(node) - 1}, got {p!r}")
                node = node[int(p)]
            elif isinstance(node, dict):
                node = node.setdefault(p, {})
            else:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i])!r} is {node!r}, not a mapping")
        if isinstance(node, list):
            last = parts[-1]
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {item!r}: {key!r} needs an index 0..{len(node) - 1}")
            node[int(last)] = parsed
        elif isinstance(node, dict):
            node[parts[-1]] = parsed
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])!r} is {node!r}, not a mapping")


def study_trials(study: Study, stage: str, chosen: dict[tuple[str, str], dict[str, Any]] | None = None
                 ) -> list[ResolvedTrial]:
    """The trials of one stage, resolved: method settings from :func:`resolved_grid` (or, with ``chosen``,
    the settings picked in selection per (method, task), resolved here once as the new points they are),
    the stage's budget and the study's track settings as their typed models."""
    track = get_track(study.track)
    budget = dict(study.budget)
    seeds = study.seeds
    if stage == "select":
        budget.update(study.selection.budget)
        seeds = study.selection.seeds
    if study.protocol == "select-then-final":
        budget["stage"] = stage
    resolved_budget = track.budget(budget, f"{study.name}.budget")
    ts = track_settings(study)
    trials = []
    for method in study.methods:
        for task in study_tasks(study):
            if chosen is not None:  # a chosen point adds what its selection trial chose inside itself (GLoRA)
                points = [resolve_point(get_method(method), chosen[(method, task)])]
            else:
                points = resolved_grid(study, method)
            for settings in points:
                for seed in seeds:
                    trials.append(resolve_trial(TrialSpec(study.track, study.benchmark, task, method, seed=int(seed)),
                                                settings=dict(settings), track_settings=ts, budget=resolved_budget,
                                                check_fit=False))
    return trials

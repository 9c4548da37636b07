"""Sweep files: the YAML schema, its full validation before any compute, and the expansion into trials.

A sweep file names one study (track, benchmark, tasks, methods with their search spaces, seeds, budget,
track settings, resources) at its top level, or several under ``studies:`` (the quickstart has an RL and
a vision study). A list in a method's settings is a grid axis; a scalar is fixed. Every error names the
key, the bad value and the valid choices.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from harness.errors import ConfigError
from harness.tracks import get_track
from harness.trial import TrialSpec
from harness.validation import format_errors

class Resources(BaseModel):
    """Per-trial resources and concurrency; fractional GPUs let several small trials share one GPU."""

    model_config = ConfigDict(extra="forbid")
    cpus_per_trial: float = Field(1.0, gt=0)
    # auto: per wave, 1 / ceil(trials / GPUs), at most 4 trials per GPU (driver.auto_gpu_share); 0 without GPUs
    gpus_per_trial: float | Literal["auto"] = "auto"
    max_concurrent: int | None = Field(None, ge=1)


class Selection(BaseModel):
    """select-then-final protocol: settings chosen on the validation split, then final runs on test."""

    model_config = ConfigDict(extra="forbid")
    seeds: list[int] = Field(default_factory=lambda: [0])
    budget: dict[str, Any] = Field(default_factory=dict)


# Names become folder and file names under --results and --leaderboard: nothing that could leave them.
SafeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SafeName
    track: str
    benchmark: str
    tasks: list[str] | Literal["all"] = "all"
    methods: dict[str, dict[str, Any]]
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    budget: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    # grid: every grid point runs once, scored on the reported split/episodes; the leaderboard shows the best
    # (EVA Table 4's convention; "best-on-reported" names it explicitly, rows labelled on-reported).
    # select-then-final: chosen on held-out data or episodes, then final runs scored apart.
    protocol: Literal["grid", "best-on-reported", "select-then-final"] = "grid"
    selection: Selection = Field(default_factory=Selection)
    resources: Resources = Field(default_factory=Resources)
    leaderboard: SafeName | None = None  # CSV name; default: the benchmark

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, v: dict) -> dict:
        if not v:
            raise ValueError("name at least one method")
        return {k: (dict(s) if s else {}) for k, s in v.items()}

    @property
    def board_name(self) -> str:
        return self.leaderboard or self.benchmark


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SafeName
    description: str = ""
    studies: list[Study]
    # Ray Tune's tracking integrations for the whole sweep (harness/tracking.py): local and offline by default
    tracking: list[Literal["mlflow", "wandb"]] = Field(default_factory=list)




def _normalise(raw: Any, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep file is a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw)
    if "studies" not in raw:  # a single-study file: every key but the sweep's own belongs to the study
        study = {k: raw.pop(k) for k in list(raw) if k not in ("name", "description", "tracking")}
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


def expand_grid(settings: dict[str, Any], method: str | None = None) -> list[dict[str, Any]]:
    """All combinations of a method's settings, lists being grid axes.

    A setting whose value is itself a list (GLoRA's ``ranks``) is a grid axis only as a list of lists:
    ``ranks: [8, 4]`` is one value, ``ranks: [[8, 4], [2]]`` two.
    """
    list_valued: set[str] = set()
    if method is not None:
        from harness.methods import get_method

        list_valued = {k for k, s in get_method(method).all_settings().items() if isinstance(s.default, (list, tuple))}
    keys = list(settings)
    axes = []
    for k, v in settings.items():
        if k in list_valued:
            axes.append(v if isinstance(v, list) and v and all(isinstance(x, list) for x in v) else [v])
        else:
            axes.append(v if isinstance(v, list) else [v])
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def study_tasks(study: Study) -> list[str]:
    benchmark = get_track(study.track).benchmark(study.benchmark)
    return list(benchmark.tasks) if study.tasks == "all" else list(study.tasks)


def validate_study(study: Study, where: str) -> None:
    """Everything the track and the method registry can check, once, before any compute: names, track
    settings, budgets (both stages) and every grid point of every method."""
    from harness.methods import get_method

    track = get_track(study.track)
    try:
        track.benchmark(study.benchmark)
    except ConfigError as e:
        raise ConfigError(f"{where}.benchmark: {e}") from None
    try:
        track.check_tasks(study.benchmark, study_tasks(study))
    except ConfigError as e:
        raise ConfigError(f"{where}.tasks: {e}") from None
    settings = track.settings(study.settings, f"{where}.settings")
    shaped = track.shape_model(settings, study.benchmark)
    for name, space in study.methods.items():
        try:
            method = get_method(name)
            for combo in expand_grid(space, name):
                resolved = method.resolve_settings(combo)
                if shaped is not None:  # on the model a trial would wrap: targets split, alpha rule applied
                    from harness.protocol import check_fit

                    check_fit(method, resolved, settings, shaped)
        except ConfigError as e:
            raise ConfigError(f"{where}.methods.{name}: {e}") from None
    track.budget(study.budget, f"{where}.budget")
    track.budget({**study.budget, **study.selection.budget}, f"{where}.selection.budget")
    if not study.seeds:
        raise ConfigError(f"{where}.seeds: give at least one seed")


def load_sweep(path: str | Path, overrides: list[str] | None = None, only: str | None = None) -> SweepFile:
    """Read, override (``--set key=value``) and validate a sweep file in full; with ``only``, just that
    study: bare overrides apply to it alone and the other studies are neither changed nor checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist" + _available_sweeps())
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
    names = [s.name for s in sweep.studies]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: study names must be unique, got {names}")
    for i, study in enumerate(sweep.studies):
        validate_study(study, str(path) if single else f"{path}: studies[{i}] ({study.name})")
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
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    parts = key.strip().split(".")
    if parts[0] in ("name", "description", "studies", "tracking"):
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
                 ) -> list[TrialSpec]:
    """The trials of one stage, with resolved method settings and budget (defaults filled in).
    ``chosen`` maps (method, task) to the settings picked in selection."""
    from harness.methods import get_method

    track = get_track(study.track)
    budget = dict(study.budget)
    seeds = study.seeds
    if stage == "select":
        budget.update(study.selection.budget)
        seeds = study.selection.seeds
    if study.protocol == "select-then-final":
        budget["stage"] = stage
    resolved_budget = track.budget(budget, f"{study.name}.budget").model_dump()
    specs = []
    for method, space in study.methods.items():
        m = get_method(method)
        for task in study_tasks(study):
            combos = [chosen[(method, task)]] if chosen is not None else expand_grid(space, method)
            for combo in combos:
                settings = m.resolve_settings(combo)
                for seed in seeds:
                    specs.append(TrialSpec(track=study.track, benchmark=study.benchmark, task=task, method=method,
                                           method_settings=dict(settings), seed=int(seed),
                                           budget=dict(resolved_budget), track_settings=dict(study.settings)))
    return specs

"""The typed track interface: what the harness needs from the RL and the vision track.

A :class:`Track` declares its benchmarks (tasks, groups, data source, primary metric and its direction),
pydantic models of its settings and budget, the stages the command line runs (data, pretraining,
benchmarks) and :meth:`Track.setup`, which builds one fine-tuning trial's model and data for the engine
(``harness/finetune.py``). Everything a sweep file or ``--set`` gives is validated once against these
models, before Ray starts or any data is built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from harness import plugins
from harness.errors import ConfigError, choices_message
from harness.validation import Bool, CompileMode, Float, mode_needs_compile, validate

if TYPE_CHECKING:
    import torch
    from torch import nn

    from harness.methods import AdapterSite
    from harness.training import Schedule
    from harness.randomness import TrialRandom
    from harness.trial import ResolvedTrial, TrialSpec

Report = Callable[[dict[str, Any]], None]

# The one place that names tracks: track name -> "module:Class", imported on first use so that listing
# tracks stays cheap. Other tracks come from plugins (register_track) or installed packages' entry points
# (group "harness.tracks"); nothing else in the harness names a track.
TRACKS: dict[str, str] = {"rl": "agents.track:RLTrack", "vision": "vision.track:VisionTrack"}
BUILTIN_TRACKS: frozenset[str] = frozenset(TRACKS)


class Benchmark(BaseModel):
    """One benchmark of a track."""

    model_config = ConfigDict(frozen=True)
    name: str
    tasks: tuple[str, ...]
    groups: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # e.g. VTAB's natural/specialized/structured
    data_source: Literal["real", "synthetic"] = "real"
    primary_metric: str
    higher_is_better: bool = True
    # A finer metric of the same evaluation, better in the same direction, that breaks ties of the primary
    # one where a selection scheduler ranks trials at its rungs (RL: the return, where success on a few
    # episodes moves in steps of 1/episodes and ties often). Choosing the final settings reads only the
    # primary metric.
    tiebreak_metric: str | None = None
    # A benchmark whose tasks are not a fixed list (the vision track's ``custom``: folders under data_root)
    # takes any task name matching this pattern; its track checks that the task exists
    # (:meth:`Track.check_inputs`), and a study names its tasks (``tasks: all`` has nothing to expand to).
    task_pattern: str | None = None

    def group_of(self, task: str) -> str:
        return next((g for g, tasks in self.groups.items() if task in tasks), "")


@dataclass
class FineTuneSetup:
    """What a track hands the engine for one trial (:meth:`Track.setup`'s answer). Defined here, beside the
    interface that returns it; its types are annotations only, so listing tracks imports no torch."""

    model: nn.Module  # with the task head in place, on ``device``
    site: AdapterSite
    device: torch.device
    schedule: Schedule  # with the track's lr and weight decay; a method's own replace them
    next_batch: Callable[[], Any]  # a training batch, on the device
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], tuple[dict[str, float], dict[str, Any]]]  # final (metrics, facts)
    base_key: str  # names the frozen base model; adapters of the same base form EigenLoRA's bank
    backbone: str
    data_source: str
    validate: Callable[[nn.Module], float] | None = None  # higher is better (GLoRA's search)
    init_batches: Callable[[], Iterable[Any]] | None = None  # EVA's initialisation data
    forward: Callable[[nn.Module, Any], Any] | None = None
    layer_inputs: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    loss_metric: str = "final_loss"  # the name of the last training loss among the metrics
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode where ``compile``
    time_data: bool = False
    save_adapter: bool = True
    facts: dict[str, Any] = field(default_factory=dict)  # track facts for the record
    close: Callable[[], None] | None = None  # frees what the setup holds (RL: its rollout workers) at the trial's end


@dataclass(frozen=True)
class PlannedWork:
    """One trial's work as its track knows it before any data is loaded: what the sweep's planner
    (``python -m harness sweep --plan``, ``harness/plan.py``) prices against measured per-update costs,
    without importing the track's modules."""

    updates: int | None  # None: they follow a data set's size, known only once it is loaded
    images: int | None = None  # training images per epoch, where they set the updates
    epochs: int | None = None  # the budget's epochs, on a track that counts them
    episode_steps: int = 0  # simulator steps of one evaluation episode (0: the trial runs no rollouts)


class TrackSettings(BaseModel):
    """Settings every track has; a track's own model adds its fields."""

    model_config = ConfigDict(extra="forbid")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: Bool = False  # torch.compile the training forward (CUDA only)
    # its torch.compile mode; reduce-overhead replays the compiled step as CUDA graphs, which removes most of
    # the host's launch time (the host-bound methods gain most: BENCHMARKS.md)
    compile_mode: CompileMode = "default"
    # torch's deterministic kernels: a GPU trial's numbers then repeat bit for bit, whatever else shares
    # the GPU; some kernels get slower (harness/randomness.py)
    deterministic: Bool = False
    lr: Float = Field(1e-3, gt=0)  # the track's learning rate; a method's lr setting or default_lr wins
    weight_decay: Float = Field(0.0, ge=0)
    # the scale of the whole LoRA family in this study (harness/scaling.py): alpha = 1, r or 2r
    alpha_rule: Literal["1", "r", "2r"] = "r"

    @field_validator("alpha_rule", mode="before")
    @classmethod
    def _rule_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("compile_mode")
    @classmethod
    def _mode_needs_compile(cls, v: str, info: ValidationInfo) -> str:
        return mode_needs_compile("compile_mode", v, info.data.get("compile"))


class TrackBudget(BaseModel):
    """Budget keys every track has."""

    model_config = ConfigDict(extra="forbid")
    stage: Literal["select", "final"] = "final"  # select: train -> validation; final: train+val -> test


class Track(ABC):
    """One track. Subclasses set the class attributes and implement the stages."""

    name: ClassVar[str]
    Settings: ClassVar[type[TrackSettings]]
    Budget: ClassVar[type[TrackBudget]]
    benchmarks: ClassVar[dict[str, Benchmark]]
    # Whether a trial's model (its shapes, hence its compiled graph) depends on its task, e.g. a classifier
    # head per dataset; the sweep driver groups trials by structure (harness/trial_routing.py)
    model_varies_by_task: ClassVar[bool] = True

    # --- validation, once --------------------------------------------------------------------------
    def settings(self, raw: dict[str, Any] | TrackSettings | None, where: str = "") -> TrackSettings:
        return validate(self.Settings, raw, where or f"{self.name} settings", f"{self.name} setting")

    def budget(self, raw: dict[str, Any] | TrackBudget | None, where: str = "") -> TrackBudget:
        return validate(self.Budget, raw, where or f"{self.name} budget", "budget key")

    def benchmark(self, name: str) -> Benchmark:
        if name not in self.benchmarks:
            raise ConfigError(choices_message(f"{self.name} benchmark", name, list(self.benchmarks)))
        return self.benchmarks[name]

    def check_tasks(self, benchmark: str, tasks: list[str]) -> list[str]:
        """The tasks, each checked against the benchmark's list (an error names the valid ones)."""
        bench = self.benchmark(benchmark)
        if bench.task_pattern is not None:
            import re

            for t in tasks:
                if not isinstance(t, str) or not re.match(bench.task_pattern, t):
                    raise ConfigError(f"task {t!r} of {benchmark}: a task name of this benchmark matches "
                                      f"{bench.task_pattern} (its tasks are found on disk, not listed)")
            return list(tasks)
        for t in tasks:
            if t not in bench.tasks:
                raise ConfigError(choices_message(f"task of {benchmark}", t, list(bench.tasks)))
        return list(tasks)

    def data_source(self, benchmark: str) -> str:
        return self.benchmark(benchmark).data_source

    def shape_model(self, settings: TrackSettings, benchmark: str) -> "tuple[nn.Module, AdapterSite] | None":
        """The trial's model on the meta device (shapes, no memory, no weights) and its adapter site, so
        that method settings are checked against the layers before any compute; None where a track
        cannot build it so (the check then happens when the trial wraps its model)."""
        return None

    def check_inputs(self, settings: TrackSettings, benchmark: str, tasks: list[str]) -> None:
        """Before any compute and before anything is written: the files the study reads (data folders and
        their layout, weights files), cheaply, so a wrong path fails in seconds with a message naming it.
        Raises ConfigError or DataError; the default has nothing to check."""

    def planned_work(self, spec: "ResolvedTrial") -> PlannedWork:
        """One trial's updates (and what sets them) and its evaluation episodes' length, before any data is
        loaded, for the sweep's planner. The default: the budget's ``steps`` where it has them, no rollouts."""
        steps = getattr(spec.budget, "steps", None)
        return PlannedWork(int(steps) if steps else None)

    # --- stages ------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, settings: TrackSettings, benchmark: str, tasks: list[str], report: Report) -> dict[str, Any]:
        """Before any trial: build (or find cached) data and pretrained backbones; bad data fails here."""

    @abstractmethod
    def make_data(self, settings: TrackSettings, tasks: list[str] | None) -> dict[str, Any]:
        """``python -m harness data <track>``."""

    @abstractmethod
    def pretrain(self, settings: TrackSettings) -> dict[str, Any]:
        """``python -m harness pretrain <track>``."""

    @abstractmethod
    def bench(self, settings: TrackSettings) -> dict[str, Any]:
        """``python -m harness bench <track>``: speed figures."""

    @abstractmethod
    def setup(self, spec: "TrialSpec", settings: TrackSettings, budget: TrackBudget, rng: "TrialRandom",
              report: Report) -> "FineTuneSetup":
        """One trial's model (head in place, on its device), data, loss and evaluations."""


    # --- optional: what `python -m harness methods --count` builds ---------------------------------
    def count_model(self, settings: TrackSettings, classes: int) -> "tuple[nn.Module, AdapterSite]":
        """The trial's model with random weights (nothing read or downloaded) and its adapter site, for
        counting each method's parameters; ``classes`` sizes the task head where the track has one.

        The default materialises :meth:`shape_model` on the CPU with seeded random values: a parameter
        count depends on shapes only. A track whose head width follows the task overrides it."""
        import torch

        shaped = self.shape_model(settings, "")
        if shaped is None:
            raise ConfigError(f"the {self.name} track builds no model without its data, so its methods cannot "
                              "be counted here")
        model, site = shaped
        model = model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)
            for b in model.buffers():
                b.zero_()
        return model, site


_instances: dict[str, Track] = {}
_entry_points_read = False


def track_names() -> list[str]:
    """Every registered track: the project's, then those of installed entry points and loaded plugins."""
    _read_entry_points()
    return list(TRACKS)


T = TypeVar("T", bound=type)


def register_track(name: str | None = None, *, replace: bool = False) -> Callable[[T], T]:
    """Class decorator: register a :class:`Track` subclass under ``name`` (default: its ``name``).

    The name is checked (a plain one, agreeing with the class's ``name``, not taken unless
    ``replace=True``); a refused registration is a ConfigError. A track is one package plus this one
    registration; its module is named in a sweep file's ``plugins`` (or ``--plugin``) or in an installed
    package's ``harness.tracks`` entry points, so that Ray's workers import it too."""
    def decorate(cls: T) -> T:
        where = f"track class {cls.__module__}.{cls.__qualname__}"
        if not (isinstance(cls, type) and issubclass(cls, Track)):
            raise ConfigError(f"{where}: register_track takes a subclass of harness.tracks.Track")
        track_name = name if name is not None else getattr(cls, "name", None)
        plugins.check_name("track", track_name, where)
        if getattr(cls, "name", track_name) != track_name:
            raise ConfigError(f"{where}: registered as {track_name!r} but its name is {cls.name!r}")
        cls.name = track_name
        target = f"{cls.__module__}:{cls.__qualname__}"
        _read_entry_points()
        if TRACKS.get(track_name, target) != target and not replace:
            raise ConfigError(f"{where}: the track name {track_name!r} is already taken ({TRACKS[track_name]}); "
                              "choose another, or pass register_track(..., replace=True)")
        missing = [a for a in ("Settings", "Budget", "benchmarks") if not hasattr(cls, a)]
        if missing or getattr(cls, "__abstractmethods__", None):
            raise ConfigError(f"{where}: a track sets {', '.join(missing) or 'its class attributes'} and implements "
                              f"{', '.join(sorted(getattr(cls, '__abstractmethods__', ()))) or 'every stage'}")
        if TRACKS.get(track_name) != target or not isinstance(_instances.get(track_name), cls):
            TRACKS[track_name] = target
            _instances[track_name] = cls()
        return cls

    return decorate


def _read_entry_points() -> None:
    """Installed packages' ``harness.tracks`` entry points, once per process (see harness/plugins.py)."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    plugins.register_entry_points("track", plugins.TRACK_GROUP, TRACKS)


def get_track(name: str) -> Track:
    """The registered track ``name``; unknown names fail listing the valid ones, and a registry entry
    that does not lead to a Track class is a ConfigError naming it."""
    _read_entry_points()
    if name not in TRACKS:
        raise ConfigError(choices_message("track", name, list(TRACKS)))
    if name not in _instances:
        entry = f"track registry entry {name!r}: {TRACKS[name]!r}"
        module_name, _, cls_name = TRACKS[name].partition(":")
        module = plugins.import_entry_module(entry, module_name)
        cls = getattr(module, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Track)):
            raise ConfigError(f"{entry}: module {module_name!r} has no Track subclass {cls_name!r}")
        if name not in _instances:  # importing the module may have registered it (register_track)
            _instances[name] = cls()
    return _instances[name]

"""The typed track interface: what the harness needs from the RL and the vision track.

A :class:`Track` declares its benchmarks (tasks, groups, data source, primary metric and its direction),
pydantic models of its settings and budget, the stages the command line runs (data, pretraining,
benchmarks) and :meth:`Track.setup`, which builds one fine-tuning trial's model and data for the engine
(``harness/finetune.py``). Everything a sweep file or ``--set`` gives is validated once against these
models, before Ray starts or any data is built.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.errors import ConfigError, choices_message
from harness.validation import Bool, Float, validate

if TYPE_CHECKING:
    from torch import nn

    from harness.finetune import FineTuneSetup
    from harness.methods import AdapterSite
    from harness.randomness import TrialRandom
    from harness.trial import TrialSpec

Report = Callable[[dict[str, Any]], None]

# track name -> "module:Class", imported on first use so that listing tracks stays cheap
TRACKS: dict[str, str] = {"rl": "agents.track:RLTrack", "vision": "vision.track:VisionTrack"}


class Benchmark(BaseModel):
    """One benchmark of a track."""

    model_config = ConfigDict(frozen=True)
    name: str
    tasks: tuple[str, ...]
    groups: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # e.g. VTAB's natural/specialized/structured
    data_source: Literal["real", "synthetic"] = "real"
    primary_metric: str
    higher_is_better: bool = True

    def group_of(self, task: str) -> str:
        return next((g for g, tasks in self.groups.items() if task in tasks), "")


class TrackSettings(BaseModel):
    """Settings every track has; a track's own model adds its fields."""

    model_config = ConfigDict(extra="forbid")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: Bool = False  # torch.compile the training forward (CUDA only)
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
        valid = self.benchmark(benchmark).tasks
        for t in tasks:
            if t not in valid:
                raise ConfigError(choices_message(f"task of {benchmark}", t, list(valid)))
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


_instances: dict[str, Track] = {}


def get_track(name: str) -> Track:
    """The registered track ``name``; unknown names fail listing the valid ones."""
    if name not in TRACKS:
        raise ConfigError(choices_message("track", name, list(TRACKS)))
    if name not in _instances:
        module, cls = TRACKS[name].split(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]

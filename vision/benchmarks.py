"""The vision track's benchmarks: one registry of loaders, one entry per benchmark.

An entry (:class:`VisionBenchmark`) is the benchmark's declaration (tasks, groups, data source, metric),
the function that loads one task's splits as tensors, and, for real data, the cheap check of its files.
The vision track (``vision/track.py``) asks only this registry; an unknown benchmark is an error naming
the known ones. A new benchmark is one :func:`register_benchmark` call (from a plugin module too, see
``harness/plugins.py``); a user's own folders in NOAH's layout need none: they run as ``custom``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.errors import ConfigError, choices_message
from harness.plugins import check_name
from harness.tracks import Benchmark
from vision import builtin, custom, domain_shift, fewshot, vtab
from vision.images import TaskData

# (track settings, data_root or None for synthetic data, task, image size, the trial's seed) -> the task's splits
LoadFn = Callable[[Any, "Path | None", str, int, int], TaskData]


def _same(task: str) -> str:
    return task


@dataclass(frozen=True)
class VisionBenchmark:
    """One vision benchmark: its declaration and how its tasks are read.

    load: the task's splits (``train800``, ``val200``, ``train800val200``, ``test`` and optionally more
        ``test_<name>`` sets scored as ``top1_<name>``), decoded at the given size.
    validate: real data only: ``(data_root, task)`` checks the task's files without decoding (raises
        DataError naming what is missing); run before any compute.
    canonical: another spelling of a task name -> the name the benchmark lists (VTAB's ``cifar100``).
    test_aliases: metrics that repeat the test top-1 under another name (domain shift's ``top1_imagenet``).
    """

    benchmark: Benchmark
    load: LoadFn
    validate: Callable[[Path, str], Any] | None = None
    canonical: Callable[[str], str] = _same
    test_aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.benchmark.name


BENCHMARKS: dict[str, VisionBenchmark] = {}


def register_benchmark(entry: VisionBenchmark, *, replace: bool = False) -> VisionBenchmark:
    """Add ``entry`` under its benchmark's name; a name already taken needs ``replace=True``, and a benchmark
    of real data needs a ``validate`` (its files are checked before any compute)."""
    name = check_name("benchmark", entry.name, f"vision benchmark {entry.name!r}")
    if name in BENCHMARKS and BENCHMARKS[name] is not entry and not replace:
        raise ConfigError(f"vision benchmark {name!r} is already registered; choose another name, or pass "
                          "register_benchmark(..., replace=True)")
    if entry.benchmark.data_source == "real" and entry.validate is None:
        raise ConfigError(f"vision benchmark {name!r} reads real data and so needs a validate function (its "
                          "files are checked before Ray starts)")
    BENCHMARKS[name] = entry
    return entry


def get_benchmark(name: str) -> VisionBenchmark:
    """The registered benchmark ``name``; unknown names fail naming the known ones."""
    if name not in BENCHMARKS:
        raise ConfigError(choices_message("vision benchmark", name, list(BENCHMARKS)))
    return BENCHMARKS[name]


# --- the project's benchmarks ----------------------------------------------------------------------

def _vtab(ts: Any, root: Path | None, task: str, size: int, seed: int) -> TaskData:
    return vtab.load_task(root, task, size)


def _fewshot(ts: Any, root: Path | None, task: str, size: int, seed: int) -> TaskData:
    return fewshot.load_task(root, task, size, seed)


def _domain_shift(ts: Any, root: Path | None, task: str, size: int, seed: int) -> TaskData:
    return domain_shift.load_task(root, size, seed, ts.shift_shots)


def _domain_shift_validate(root: Path, task: str) -> Any:
    return domain_shift.validate(root)


def _custom(ts: Any, root: Path | None, task: str, size: int, seed: int) -> TaskData:
    return custom.load_task(root, task, size)


def _builtin_loader(benchmark: str) -> LoadFn:
    def load(ts: Any, root: Path | None, task: str, size: int, seed: int) -> TaskData:
        return builtin.load_task(benchmark, task, seed=seed, data_seed=ts.data_seed)

    return load


for _entry in (
    VisionBenchmark(Benchmark(name="vtab1k", tasks=tuple(vtab.TASKS), groups=vtab.GROUPS, primary_metric="top1"),
                    _vtab, vtab.validate, vtab.canonical),
    VisionBenchmark(Benchmark(name="fewshot", tasks=tuple(fewshot.TASKS), primary_metric="top1"),
                    _fewshot, fewshot.validate),
    VisionBenchmark(Benchmark(name="domain_shift", tasks=tuple(domain_shift.TASKS), primary_metric="top1"),
                    _domain_shift, _domain_shift_validate, test_aliases=("top1_imagenet",)),
    VisionBenchmark(Benchmark(name="custom", tasks=(), task_pattern=custom.TASK_PATTERN, primary_metric="top1"),
                    _custom, custom.validate),
    VisionBenchmark(Benchmark(name="builtin", tasks=tuple(builtin.TASKS), groups=builtin.GROUPS,
                              data_source="synthetic", primary_metric="top1"), _builtin_loader("builtin")),
    VisionBenchmark(Benchmark(name="builtin-fewshot", tasks=tuple(builtin.FEWSHOT_TASKS), data_source="synthetic",
                              primary_metric="top1"), _builtin_loader("builtin-fewshot")),
    VisionBenchmark(Benchmark(name="builtin-shift", tasks=tuple(builtin.SHIFT_TASKS), groups=builtin.GROUPS,
                              data_source="synthetic", primary_metric="top1"), _builtin_loader("builtin-shift")),
):
    register_benchmark(_entry)
del _entry

__all__ = ["BENCHMARKS", "VisionBenchmark", "get_benchmark", "register_benchmark"]

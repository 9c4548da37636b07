"""``python -m harness bench selection``: what early stopping saves in a study's selection stage, and
whether it still chooses the same settings.

The same select-then-final study runs twice, each as its own ``python -m harness sweep`` process: once
with the full selection grid (no scheduler) and once under the scheduler (the study's own
``selection.scheduler`` and Tune parameters, or ``scheduler`` given here). Per (method, task) it reports
the selection updates each run spent (a trial the scheduler stopped counts the updates it had done), the
settings each run chose for the final stage, whether they agree, and both final scores; in total the
ratio of selection updates (grid / scheduler) and the share of (method, task) pairs that agree. Held-out
scores on a few episodes tie often (several settings at 0.9 of 10 episodes), so a pair also says whether
the scheduler's choice is *as good* as the grid's by the grid's own evidence: its full-budget selection score
in the grid run equals the best one there (``equally_good``).

A run cut short (a job's time limit) is not lost: the same command again resumes it (``--resume``), and
finished runs are kept. Methods with a single grid point skip selection in both runs and are left out.
``final: false`` runs the selection stages only (``sweep --selection-only``): the choices are then the
ones the sweep's rule makes from the selection records, and there are no final scores. ``parallel: true``
runs the two sweeps at once, each with its own local Ray instance (for a GPU that one run leaves
half idle); the update counts and choices do not depend on it, wall times do.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from harness.costs import record_updates
from harness.driver import choose_settings
from harness.errors import ConfigError
from harness.subprocesses import run_logged
from harness.sweep_file import Study, load_sweep, selection_methods
from harness.tracks import get_track
from harness.validation import validate



class SelectionBenchSettings(BaseModel):
    """``--set`` keys of ``bench selection``."""

    model_config = ConfigDict(extra="forbid")
    file: str = "sweeps/cw10-short.yaml"  # a sweep file with a select-then-final study
    only: str | None = None  # its study, where the file has several
    sets: list[str] = Field(default_factory=list)  # sweep overrides for both runs, e.g. ["budget.steps=10000"]
    # the scheduler run's selection settings, e.g. {scheduler: asha, grace_period: 625, reduction_factor: 4};
    # empty: the study's own
    scheduler: dict[str, Any] = Field(default_factory=dict)
    workdir: str = "bench-selection"  # results and boards of both runs; the same value resumes them
    final: bool = True  # false: selection stages only, no final stage (nor final scores)
    parallel: bool = False  # both runs at once, each its own local Ray instance


def _study(s: SelectionBenchSettings, sets: list[str]) -> Study:
    sweep = load_sweep(s.file, sets, only=s.only, confirmed=True)
    studies = [st for st in sweep.studies if s.only in (None, st.name)]
    if len(studies) != 1:
        raise ConfigError(f"bench selection: {s.file} has {len(studies)} studies "
                          f"({', '.join(st.name for st in sweep.studies)}): name one with --set only=NAME")
    return studies[0]


def _selection_sets(s: SelectionBenchSettings) -> dict[str, list[str]]:
    """The ``--set`` overrides of each run; checked as a sweep would check them, before any compute."""
    study = _study(s, list(s.sets))
    if study.protocol != "select-then-final":
        raise ConfigError(f"bench selection: study {study.name!r} has protocol {study.protocol!r}; only "
                          "'select-then-final' has a selection stage (set protocol=select-then-final)")
    scheduler = s.scheduler or study.selection.scheduler_settings()
    if not scheduler.get("scheduler"):
        raise ConfigError(f"bench selection: study {study.name!r} names no selection.scheduler; give one, e.g. "
                          "--set 'scheduler={scheduler: asha, grace_period: 625, reduction_factor: 4}'")
    if not selection_methods(study):
        raise ConfigError(f"bench selection: no method of study {study.name!r} has more than one grid point, "
                          "so there is nothing to select")
    seeds = json.dumps({"seeds": study.selection.seeds})
    runs = {"grid": [*s.sets, f"selection={seeds}"],
            "scheduler": [*s.sets, "selection=" + json.dumps({"seeds": study.selection.seeds, **scheduler})]}
    for sets in runs.values():
        _study(s, sets)  # the scheduler's parameters are validated here, before either run starts
    return runs


def _records(results: Path, select: bool) -> list[dict[str, Any]]:
    pattern = "*-select-records.jsonl" if select else "*-records.jsonl"
    out = []
    for path in sorted(results.rglob(pattern)):
        if not select and path.name.endswith("-select-records.jsonl"):
            continue
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _settings(r: dict[str, Any]) -> dict[str, Any]:
    s = r.get("settings") or {}
    return json.loads(s) if isinstance(s, str) else s


def _matches(chosen: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a selection trial's grid point is the chosen one (the chosen settings may add what the trial
    chose inside itself, GLoRA's subnet)."""
    return all(chosen.get(k) == v for k, v in settings.items())


def compare(grid: Path, scheduled: Path, metric: str, higher_is_better: bool = True,
            tiebreak: str | None = None) -> dict[str, Any]:
    """Per (method, task) and in total: selection updates of both runs, the settings each chose (the final
    records' settings, which the selection stage picked), agreement, whether the scheduler's choice scored
    the best in the grid's own selection (ties count), and the final ``metric`` of each."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    grid_scores: dict[tuple[str, str], list[tuple[dict[str, Any], float]]] = {}
    for name, results in (("grid", grid), ("scheduler", scheduled)):
        for r in _records(results, select=True):
            entry = pairs.setdefault((r["method"], r["task"]), {})
            entry[f"{name}_updates"] = entry.get(f"{name}_updates", 0) + record_updates(r)
            entry[f"{name}_trials"] = entry.get(f"{name}_trials", 0) + 1
            score = r["metrics"].get(metric) if "metrics" in r else r.get(metric)
            if name == "grid" and r.get("status") == "ok" and score is not None:
                grid_scores.setdefault((r["method"], r["task"]), []).append((_settings(r), float(score)))
        finals: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in _records(results, select=False):
            finals.setdefault((r["method"], r["task"]), []).append(r)
        for key, rows in finals.items():
            if key not in pairs:
                continue  # a method that skipped selection
            rows.sort(key=lambda r: r.get("seed", 0))
            pairs[key][f"{name}_chosen"] = _settings(rows[0])
            scores = [r["metrics"][metric] if "metrics" in r else r.get(metric) for r in rows]
            scores = [float(x) for x in scores if x is not None]
            pairs[key][f"{name}_final_{metric}"] = round(sum(scores) / len(scores), 4) if scores else None
        # without a final stage (``final: false``), what the sweep's rule chooses from the selection records
        for key, settings in choose_settings(_records(results, select=True), metric, higher_is_better,
                                              tiebreak).items():
            if key in pairs:
                pairs[key].setdefault(f"{name}_chosen", settings)
    rows = []
    for (method, task), e in sorted(pairs.items()):
        agree = "grid_chosen" in e and e.get("grid_chosen") == e.get("scheduler_chosen")
        row = {"method": method, "task": task, **e, "same_choice": agree}
        if "scheduler_chosen" in e and grid_scores.get((method, task)):
            # the grid run's selection score (mean over selection seeds) of each point, the scheduler's among them
            points: dict[str, list[float]] = {}
            for settings, score in grid_scores[(method, task)]:
                points.setdefault(json.dumps(settings, sort_keys=True), []).append(score)
            means = {k: sum(v) / len(v) for k, v in points.items()}
            theirs = [m for k, m in means.items() if _matches(e["scheduler_chosen"], json.loads(k))]
            best = max(means.values()) if higher_is_better else min(means.values())
            row["grid_best_score"] = round(best, 4)
            row["grid_score_of_scheduler_choice"] = round(theirs[0], 4) if theirs else None
            row["equally_good"] = bool(theirs) and abs(theirs[0] - best) < 1e-9
        rows.append(row)
    grid_total = sum(r.get("grid_updates", 0) for r in rows)
    sched_total = sum(r.get("scheduler_updates", 0) for r in rows)
    complete = [r for r in rows if "grid_chosen" in r and "scheduler_chosen" in r]
    return {"pairs": rows, "grid_updates": grid_total, "scheduler_updates": sched_total,
            "update_ratio": round(grid_total / sched_total, 3) if sched_total else None,
            "same_choice": sum(r["same_choice"] for r in complete),
            "equally_good": sum(bool(r.get("equally_good")) for r in complete), "compared": len(complete)}


def bench_selection(overrides: dict[str, Any]) -> dict[str, Any]:
    """Run the grid and the scheduler run of one study (or resume them) and compare their selection."""
    s = validate(SelectionBenchSettings, overrides, "bench selection")
    runs = _selection_sets(s)
    study = _study(s, runs["grid"])
    benchmark = get_track(study.track).benchmarks[study.benchmark]
    metric = benchmark.primary_metric
    work = Path(s.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # a selection-only run is finished for this bench, not for a later one that wants the final stage
    marker = "" if s.final else "-selection"
    todo = {}
    for name, sets in runs.items():
        if (work / f"{name}{marker}.done").exists() or (work / f"{name}.done").exists():
            print(f"[bench selection] {name}: finished earlier, kept", file=sys.stderr)
            continue
        results = work / name
        cmd = [sys.executable, "-m", "harness", "sweep", str(Path(s.file).resolve()), "--results", str(results),
               "--leaderboard", str(work / f"{name}-board"), "--no-dashboard", "--yes"]
        cmd += ["--only", s.only] if s.only else []
        cmd += [x for item in sets for x in ("--set", item)]
        cmd += [] if s.final else ["--selection-only"]
        if results.exists() and any(results.rglob("tuner.pkl")):
            cmd.append("--resume")
        todo[name] = cmd
    with ThreadPoolExecutor(max_workers=len(todo) if s.parallel and todo else 1) as pool:
        codes = dict(zip(todo, pool.map(lambda n: run_logged(todo[n], work / f"{n}.log",
                                                             prefix=f"[{n}] " if s.parallel else ""), todo)))
    for name, rc in codes.items():
        if rc == 0:
            (work / f"{name}{marker}.done").write_text("ok\n")
    failed = [f"the {name} run exited {rc} (log {work / f'{name}.log'})" for name, rc in codes.items() if rc]
    if failed:
        raise ConfigError(f"bench selection: {'; '.join(failed)}; the same command again resumes it")
    result = compare(work / "grid", work / "scheduler", metric, benchmark.higher_is_better,
                     benchmark.tiebreak_metric)
    return {"study": study.name, "metric": metric, "runs": runs, **result}

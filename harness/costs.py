"""``python -m harness costs RESULTS``: what a sweep cost, from its trials' own records.

The plan (``sweep FILE --plan``) prices a sweep before compute; this reads what it spent. It works on a
finished sweep and on one still running or interrupted (``--resume`` later): each trial's last report in
its Tune folder (``RESULTS/<sweep>/<study>-<stage>[-waveN]/<trial>/result.json``) carries the trial's
record once it finished or a scheduler stopped it, so nothing waits for the stage's records file.

Per trial the cost is its record's: updates trained (where a scheduler stopped it, the updates done by
then), its wall time from the trial's start in its worker to its record (``extra.total_wall_s``: data,
model build, compilation, training, evaluations, search), the worker's start-up before it when the trial
began its process (``extra.timing.process_to_trial_s``; Ray holds the trial's resources from the worker's
start) and the GPU share Ray gave it (``extra.placement.ray.gpus``), so ``gpu_minutes`` is (start-up +
wall) x share: the GPU time the trial held, whether or not its kernels kept the GPU busy.
A trial retried after its process died, or resumed from a checkpoint, counts its last attempt only (the
record's times are the last attempt's); ``resumed`` counts those trials, whose earlier work is not seen.
Trials without a record yet (running, or cut by an interruption) are counted as ``unfinished``.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

STAGE_DIR = re.compile(r"^(?P<study>.+)-(?P<stage>select|final)(?:-wave(?P<wave>\d+))?$")
COST_KEYS = ("study", "stage", "method")


@dataclass(frozen=True)
class TrialSpend:
    """One trial's cost, as its record gives it (see the module doc)."""

    sweep: str
    study: str
    stage: str
    wave: int
    method: str
    task: str
    status: str  # ok / failed / stopped (by the scheduler) / unfinished (no record yet)
    updates: int
    wall_s: float
    gpu_share: float
    ms_per_update: float
    train_peak_memory_mb: float
    resumed: bool
    device: str
    # the worker's start-up before the trial, when the trial began its process (0 in a reused one)
    start_s: float = 0.0
    track: str = ""
    # the record's extra facts (its ``timing`` block among them: :func:`phase_table`); empty when unfinished
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def gpu_s(self) -> float:
        return (self.start_s + self.wall_s) * self.gpu_share

    def columns(self) -> dict[str, Any]:
        """The spend as a table row (the record's extra facts left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"} | {"gpu_s": self.gpu_s}


def json_field(value: Any) -> dict[str, Any]:
    """A record's JSON field (``extra``, ``budget``) as a dict, whether the record was read from a JSON line
    (a string; empty: no field) or is a live one (a dict, or None)."""
    if isinstance(value, str):
        return json.loads(value) if value else {}
    return dict(value or {})


def record_updates(record: dict[str, Any]) -> int:
    """A record's updates: where a scheduler stopped the trial, the updates done by then; else all it
    trained (``extra.updates``), or its budget's steps (epochs) for records older than that field."""
    extra = json_field(record.get("extra"))
    if "stopped_at_update" in extra:
        return int(extra["stopped_at_update"])
    if "updates" in extra:
        return int(extra["updates"])
    budget = json_field(record.get("budget"))
    return int(budget.get("steps") or budget.get("epochs") or 0)


def _last_report(path: Path) -> dict[str, Any]:
    """The last complete line of a trial's result.json (the file may be written while it is read)."""
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        try:
            last = json.loads(line)
        except json.JSONDecodeError:
            continue
    return last


def _trial_spend(sweep: str, study: str, stage: str, wave: int, folder: Path) -> TrialSpend:
    report = _last_report(folder / "result.json") if (folder / "result.json").is_file() else {}
    if "record" not in report:  # running, or cut: its spec (Tune's params.json) names it
        spec = json_field(json.loads((folder / "params.json").read_text()).get("spec"))
        return TrialSpend(sweep, study, stage, wave, str(spec.get("method", "")), str(spec.get("task", "")),
                         "unfinished", int(report.get("update", 0) or 0), 0.0, 0.0, 0.0, 0.0, False, "",
                         track=str(spec.get("track", "")))
    rec = json.loads(report["record"])
    extra = json_field(rec.get("extra"))
    ray = (extra.get("placement") or {}).get("ray") or {}
    status = str(rec.get("status", ""))
    if status == "ok" and "stopped_at_update" in extra:
        status = "stopped"
    return TrialSpend(
        sweep=sweep, study=study, stage=stage, wave=wave, method=str(rec.get("method", "")),
        task=str(rec.get("task", "")), status=status, updates=record_updates(rec),
        wall_s=float(extra.get("total_wall_s", rec.get("wall_time_s", 0.0)) or 0.0),
        gpu_share=float(ray.get("gpus", 0.0) or 0.0), ms_per_update=float(rec.get("ms_per_update", 0.0) or 0.0),
        train_peak_memory_mb=float(rec.get("train_peak_memory_mb", 0.0) or 0.0),
        resumed=bool(extra.get("resumed_from_update")), device=str(rec.get("device_name", "")),
        start_s=0.0 if extra.get("process_trials_before") else
        float((extra.get("timing") or {}).get("process_to_trial_s", 0.0) or 0.0), track=str(rec.get("track", "")),
        extra=extra)


def trial_costs(results: str | Path) -> list[TrialSpend]:
    """Every trial under a sweep's ``--results`` folder (or one sweep's folder inside it)."""
    root = Path(results)
    if not root.is_dir():
        raise ConfigError(f"costs: {str(results)!r} is not a folder; give a sweep's --results folder "
                          "(default: results)")
    costs: list[TrialSpend] = []
    for stage_dir in sorted(p for p in root.rglob("*") if p.is_dir() and STAGE_DIR.match(p.name)):
        m = STAGE_DIR.match(stage_dir.name)
        trials = sorted(p for p in stage_dir.iterdir() if p.is_dir() and (p / "params.json").is_file())
        costs += [_trial_spend(stage_dir.parent.name, m["study"], m["stage"], int(m["wave"] or 0), t) for t in trials]
    if not costs:
        raise ConfigError(f"costs: no trial folders under {str(results)!r} (expected "
                          "<results>/<sweep>/<study>-<select|final>/<trial>/result.json, as `harness sweep` writes)")
    return costs


def cost_table(costs: list[TrialSpend], by: tuple[str, ...] = COST_KEYS) -> "pd.DataFrame":
    """Costs summed per ``by`` group, plus a ``total`` row: trials by outcome, updates, GPU-minutes (wall x
    GPU share), trial-minutes (wall), median ms/update of the trials that trained, largest peak memory."""
    import pandas as pd  # heavy: pandas is only needed once costs are tabled

    df = pd.DataFrame([c.columns() for c in costs])

    def summary(part: "pd.DataFrame") -> dict[str, Any]:
        trained = part[part["ms_per_update"] > 0]
        return {"trials": len(part), "ok": int((part["status"] == "ok").sum()),
                "stopped": int((part["status"] == "stopped").sum()),
                "failed": int((part["status"] == "failed").sum()),
                "unfinished": int((part["status"] == "unfinished").sum()),
                "resumed": int(part["resumed"].sum()), "updates": int(part["updates"].sum()),
                "gpu_minutes": round(float(part["gpu_s"].sum()) / 60, 2),
                "trial_minutes": round(float(part["wall_s"].sum()) / 60, 2),
                "median_ms_per_update": round(float(trained["ms_per_update"].median()), 2) if len(trained) else 0.0,
                "peak_memory_mb": round(float(part["train_peak_memory_mb"].max()), 1)}

    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))), **summary(part)}
            for key, part in df.groupby(list(by), sort=True)]
    rows.append({**{k: ("total" if i == 0 else "") for i, k in enumerate(by)}, **summary(df)})
    return pd.DataFrame(rows)


def against_plan(spent: list[TrialSpend], waves: list[Any]) -> "pd.DataFrame":
    """Per (study, stage): what the plan priced (``harness.plan.plan_sweep``'s waves: trials, updates,
    GPU-hours) beside what the trials' records say was spent; ``*_ratio`` is spent / planned."""
    import pandas as pd  # heavy: pandas is only needed once costs are tabled

    planned: dict[tuple[str, str], dict[str, float]] = {}
    for w in waves:
        entry = planned.setdefault((w.study, w.stage.split(" ")[0]), {"trials": 0, "updates": 0.0, "gpu_h": 0.0})
        entry["trials"] += w.trials
        entry["updates"] += w.updates or 0
        entry["gpu_h"] += w.gpu_hours or 0.0
    done = cost_table(spent, ("study", "stage"))
    done = done[done["study"] != "total"]
    rows = []
    for key in sorted(set(planned) | {(r.study, r.stage) for r in done.itertuples()}):
        plan = planned.get(key, {})
        mine = done[(done["study"] == key[0]) & (done["stage"] == key[1])]
        got = mine.iloc[0].to_dict() if len(mine) else {}
        row = {"study": key[0], "stage": key[1], "planned_trials": int(plan.get("trials", 0)),
               "trials": int(got.get("trials", 0)), "unfinished": int(got.get("unfinished", 0)),
               "planned_updates": int(plan.get("updates", 0)), "updates": int(got.get("updates", 0)),
               "planned_gpu_minutes": round(60 * plan.get("gpu_h", 0.0), 2),
               "gpu_minutes": float(got.get("gpu_minutes", 0.0))}
        for what in ("updates", "gpu_minutes"):
            row[f"{what}_ratio"] = (round(row[what] / row[f"planned_{what}"], 3) if row[f"planned_{what}"]
                                    else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the ``(start, end)`` spans: time in which at least one of them ran."""
    return sum(b - a for a, b in _merged(spans))


def _trial_gpus(extra: dict[str, Any]) -> str:
    """The device a trial trained on: its GPU(s) as Ray gave them, else "cpu"."""
    gpus = ((extra.get("placement") or {}).get("ray") or {}).get("gpu_ids") or []
    return ",".join(str(g) for g in gpus) or "cpu"


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of the ``(start, end)`` spans as disjoint spans, in order."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def device_spans(extras: list[dict[str, Any]]) -> dict[str, float]:
    """Per device, the seconds in which the sweep was running trials and that device had some: the union of
    all trials' lives (a process's start-up included) splits into stretches, a session of a sweep resumed
    later being one of them, and a device's span is the stretches in which any of its trials lived. So the
    hours between two sessions count for no device, nor does a session on a host with fewer GPUs count
    against the GPUs it lacked; the tail of a wave, with one device's trials done and another's running,
    counts for both."""
    lives: list[tuple[str, float, float]] = []
    for e in extras:
        t = e.get("timing") or {}
        if "started_at" not in e or "total_s" not in t:
            continue
        start = float(e["started_at"])
        end = start + float(t["total_s"])
        if not e.get("process_trials_before"):  # the worker held its share from its start
            start -= float(t.get("process_to_trial_s", 0.0)) + float(t.get("start_delay_s", 0.0))
        lives.append((_trial_gpus(e), start, end))
    stretches = _merged([(a, b) for _, a, b in lives])
    spans: dict[str, float] = {}
    for device in sorted({d for d, _, _ in lives}):
        mine = [(a, b) for d, a, b in lives if d == device]
        spans[device] = sum(b - a for a, b in stretches if any(x < b and y > a for x, y in mine))
    return spans


def time_breakdown(records: list[dict[str, Any]], span: float | None = None) -> dict[str, Any] | None:
    """Where the trials' time went: each phase of ``extra.timing`` (``harness.finetune.PHASES``) summed over the
    trials and as a share of their summed wall time; the time before each process's first trial in it (a
    Ray worker's start-up; a trial in a reused process has none: ``trials_in_reused_processes``) and the
    waits of a wave's staggered first trials (``start_delay_s``); and, per
    device, the share of its span in which none of its trials was training (its first update to its last):
    the GPU idle time that start-up, compilation, rollouts and saving imply. The span is ``span`` seconds
    for every device (one uninterrupted run, as ``bench scale`` times it), else each device's own
    (:func:`device_spans`). None when no record has a timing (records older than it)."""
    from harness.finetune import PHASES  # heavy: harness.finetune imports torch

    extras = [e for e in (json_field(r.get("extra")) for r in records) if isinstance(e.get("timing"), dict)]
    timed = [(e["timing"], _trial_gpus(e)) for e in extras]
    if not timed:
        return None
    # a trial in a process that ran trials before (actor reuse) had no start-up of its own: the time from
    # the process's start to it was its predecessors'
    first = [e["timing"] for e in extras if not e.get("process_trials_before")]
    # shares from the unrounded sums: short trials' phases rounded to 10 ms first would not add up to 100
    phase_sums = {f"{p}_s": sum(float(t.get(f"{p}_s", 0.0)) for t, _ in timed) for p in PHASES}
    phases = {k: round(v, 2) for k, v in phase_sums.items()}
    total = sum(float(t["total_s"]) for t, _ in timed)
    training: dict[str, list[tuple[float, float]]] = {}
    for t, device in timed:
        if t.get("training_span"):
            a, b = t["training_span"]
            training.setdefault(device, []).append((float(a), float(b)))
    spans_by_device = device_spans(extras) if span is None else {d: span for d in training}
    idle = {d: round(1.0 - min(1.0, busy_seconds(spans) / spans_by_device[d]), 4)
            for d, spans in sorted(training.items()) if spans_by_device.get(d, 0.0) > 0}
    return {"trials": len(timed), "trial_s": round(total, 2), "phases_s": phases,
            "phase_share": {k: round(v / total, 4) if total > 0 else None for k, v in phase_sums.items()},
            "process_to_trial_s": round(sum(float(t.get("process_to_trial_s", 0.0)) for t in first), 2),
            "processes_started": len(first), "trials_in_reused_processes": len(timed) - len(first),
            # the waits before a wave's first trials that share a GPU (harness.placement.start_delays)
            "start_delay_s": round(sum(float(t.get("start_delay_s", 0.0)) for t in first), 2),
            "first_updates_mean_s": _first_updates_by_start(extras),
            "reused_trials_that_compiled": _reused_compiling(extras),
            "idle_share_by_device": idle,
            "idle_share": round(sum(idle.values()) / len(idle), 4) if idle else None}


def _first_updates_by_start(extras: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean seconds of the first updates (compilation, graph recording, warm-up) by what the trial's
    process had done before: ``fresh_process`` (its first trial), ``reused_process`` (a later one), and of
    those, ``reused_compiled_nothing``, the trials whose step compiled no graph (it ran a shared one:
    ``extra.graphs_compiled`` 0). None where no trial was of that kind."""
    groups: dict[str, list[float]] = {"fresh_process": [], "reused_process": [], "reused_compiled_nothing": []}
    for e in extras:
        seconds = float(e["timing"].get("first_updates_s", 0.0))
        if not e.get("process_trials_before"):
            groups["fresh_process"].append(seconds)
            continue
        groups["reused_process"].append(seconds)
        if e.get("graphs_compiled") == 0:
            groups["reused_compiled_nothing"].append(seconds)
    return {k: round(sum(v) / len(v), 2) if v else None for k, v in groups.items()}


def _reused_compiling(extras: list[dict[str, Any]]) -> int | None:
    """How many trials in reused processes compiled a graph (``extra.graphs_compiled`` above 0): those that
    met a structure their process had not run (``harness.trial_routing``). None for records without the count."""
    reused = [e for e in extras if e.get("process_trials_before")]
    if not reused or any("graphs_compiled" not in e for e in reused):
        return None
    return sum(1 for e in reused if e["graphs_compiled"])


def phase_table(costs: list[TrialSpend], by: tuple[str, ...] = ("study", "stage")) -> "pd.DataFrame":
    """Per ``by`` group of finished trials: :func:`time_breakdown` as a row. Each phase's share of the
    trials' summed wall time (``*_pct``; the phases partition it), the worker start-ups before the trials
    that began a process (``process_start_s``, beside the trials' own time, not in it), and the mean share
    of each device's span (:func:`device_spans`: the stretches in which the sweep ran trials and the device
    had some) in which the device had no trial training (``idle_pct``)."""
    import pandas as pd  # heavy: pandas is only needed once costs are tabled

    rows = []
    groups: dict[tuple[Any, ...], list[TrialSpend]] = {}
    for c in costs:
        if isinstance(c.extra.get("timing"), dict):
            groups.setdefault(tuple(getattr(c, k) for k in by), []).append(c)
    for key, part in sorted(groups.items()):
        b = time_breakdown([{"extra": c.extra} for c in part])
        if b is None:
            continue
        row: dict[str, Any] = {**dict(zip(by, key)), "trials": b["trials"],
                               "trial_minutes": round(b["trial_s"] / 60, 2)}
        row |= {f"{k.removesuffix('_s')}_pct": round(100 * v, 1) for k, v in b["phase_share"].items() if v is not None}
        row |= {"process_start_s": b["process_to_trial_s"], "processes_started": b["processes_started"],
                "reused_process": b["trials_in_reused_processes"],
                "reused_compiled": b["reused_trials_that_compiled"],
                "idle_pct": round(100 * b["idle_share"], 1) if b["idle_share"] is not None else None}
        rows.append(row)
    return pd.DataFrame(rows)


# the phases of a trial outside its training updates and its evaluations (which the plan prices from the
# measured update and rollout rates). Every trial that runs pays the set-up, the adapters' wrap (EVA's
# initialisation, PiSSA's SVD), the first updates (compilation) and the save; only a trial that reaches the end
# of its budget runs the end-of-training step (GLoRA's subnet search), which a scheduler's stop skips, so the
# plan prices the two apart
ALWAYS_PHASES = ("setup", "wrap", "first_updates", "save")
END_PHASES = ("finalize",)
OVERHEAD_PHASES = ALWAYS_PHASES + END_PHASES


def _phase_seconds(timing: dict[str, Any], phases: tuple[str, ...]) -> float:
    return sum(float(timing.get(f"{p}_s", 0.0)) for p in phases)


def _mean_table(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Per stage, each method's mean (and ``default``'s, over all the stage's samples), to 0.01 s."""
    return {stage: {m: round(statistics.fmean(v), 2) for m, v in sorted(per.items())}
            for stage, per in sorted(samples.items())}


def trial_overheads(costs: list[TrialSpend]) -> dict[str, Any]:
    """What the finished trials spent besides training and evaluating, as ``harness.plan`` prices it, per
    track (``tracks``; one track's entry is the ``trial_overhead`` of that track in
    ``benchmarks/update-costs.json``), with per stage each method's mean and ``default`` (the mean over all
    the stage's trials):

    - ``seconds``: the phases every trial pays (:data:`ALWAYS_PHASES`), over every finished trial whose record
      has a timing block, run to the end or stopped by a scheduler (a stopped trial's record carries its timing
      up to the stop; records older than that have none and are left out); ``trials`` counts them per stage;
    - ``end_seconds``: the phases only a trial that reaches the end of its budget runs (:data:`END_PHASES`:
      GLoRA's subnet search), over those trials; ``end_trials`` counts them per stage;
    - ``start_s``: the mean worker start-up before a trial that began its process.

    Means, not medians: the plan adds the figures up over trials. Files written before ``end_seconds`` hold
    both kinds of phases in ``seconds``, averaged over the trials that ran to their end; the plan still reads
    them and prices that figure for every trial (``harness.plan.trial_overhead``). A ConfigError when no
    record has a timing block."""
    seconds: dict[str, dict[str, dict[str, list[float]]]] = {}
    ends: dict[str, dict[str, dict[str, list[float]]]] = {}
    starts: dict[str, list[float]] = {}
    for c in costs:
        timing = c.extra.get("timing")
        if c.status not in ("ok", "stopped") or not isinstance(timing, dict):
            continue
        parts = [(seconds, ALWAYS_PHASES)] + ([(ends, END_PHASES)] if c.status == "ok" else [])
        for table, phases in parts:
            per_method = table.setdefault(c.track, {}).setdefault(c.stage, {})
            spent = _phase_seconds(timing, phases)
            per_method.setdefault(c.method, []).append(spent)
            per_method.setdefault("default", []).append(spent)
        if not c.extra.get("process_trials_before") and "process_to_trial_s" in timing:
            starts.setdefault(c.track, []).append(float(timing["process_to_trial_s"]))
    if not seconds:
        raise ConfigError("no finished trial's record has a timing block (records older than the timing, or no "
                          "trial finished yet): nothing to measure the overheads from")
    tracks = {track: {"start_s": round(statistics.fmean(starts[track]), 2) if starts.get(track) else 0.0,
                      "seconds": _mean_table(stages), "end_seconds": _mean_table(ends.get(track, {})),
                      "trials": {stage: len(per["default"]) for stage, per in sorted(stages.items())},
                      "end_trials": {stage: len(per["default"]) for stage, per in sorted(ends.get(track, {}).items())}}
              for track, stages in sorted(seconds.items())}
    return {"tracks": tracks, "devices": sorted({c.device for c in costs if c.extra.get("timing")} - {""}),
            "phases": list(ALWAYS_PHASES), "end_phases": list(END_PHASES)}


def format_costs(table: "pd.DataFrame") -> str:
    """The table as aligned text, with what the columns mean."""
    return (table.to_string(index=False) + "\n\ngpu_minutes: each trial's wall time (its worker's start-up, "
            "when it began the process, to its record) x the GPU share Ray gave it; trial_minutes: trial start "
            "to record, no start-up, no share; a retried or resumed trial counts its last attempt (resumed: how "
            "many)")


__all__ = ["ALWAYS_PHASES", "COST_KEYS", "END_PHASES", "OVERHEAD_PHASES", "TrialSpend", "against_plan",
           "busy_seconds", "cost_table", "device_spans", "format_costs", "json_field", "phase_table",
           "record_updates", "time_breakdown", "trial_costs", "trial_overheads"]

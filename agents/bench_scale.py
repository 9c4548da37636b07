"""``python -m harness bench scale``: one CW10 sweep of the paper DT on 1, 2, 4, 8 GPUs of one host.

Each count N in ``counts`` runs the same sweep file (tasks x methods x seeds, one grid point per method)
as its own ``python -m harness sweep --gpus N`` process: a fresh local Ray instance that may hand out the
first N visible GPUs, each trial holding ``gpus_per_trial`` of one (auto: up to four per GPU, spread). The data and the pretrained DT are
built once, before the first count, so every count times trials only. Per count it reports the trials'
aggregate updates/s and trials/hour over the span from the first trial's start to the last one's end,
the scaling efficiency (rate on N / (N x rate on the first count's one)), how many trials each GPU ran,
each GPU's utilisation (nvidia-smi), and where the trials' time went (their ``extra.timing`` phases
summed, and the share of the span in which no trial of a device was training: the GPU idle time that
start-up, compilation, rollouts and saving imply). It also compares each count's leaderboard rows with
the first count's: with the same seeds and settings the results (scores, parameter counts, settings)
must be equal; the measurements (memory, times, dates, commits: ``harness.trial.MEASUREMENT_FIELDS``)
may differ and are reported apart, as differences, never as a failed comparison.

A count cut short by a time limit is not lost: the same command again (same ``--set`` values and
``workdir``) keeps the finished counts and resumes the interrupted sweep (Tune keeps its finished
trials). Such a count's throughput is not comparable with an uninterrupted one's: trials killed by the
cut had done updates that the records do not show and that their retries did again, and the span in
which only they ran is not seen. So a resumed count says ``comparable: false`` with the reason, gets no
scaling efficiency (nor do the others, when it is the first count), and reports the resumed call's own
figures apart (``resumed_call``: the updates done in that call, over the time its trials ran).

``axis=cpu`` scales over CPU slots instead (a slot: ``cpus_per_trial`` cores, no GPU): the same code on a
machine without GPUs, which is how the tests run it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.cache import atomic_write_text
from harness.costs import busy_seconds, json_field, time_breakdown
from harness.errors import ConfigError
from harness.gpu_monitor import GpuMonitor
from harness.placement import host_cpus, visible_gpus
from harness.process_cache import REUSE_ENV
from harness.subprocesses import run_logged
from harness.sweep_file import load_sweep, study_trials
from harness.trial import is_measurement
from harness.validation import Bool, Float, Int, validate

ROOT = Path(__file__).resolve().parents[1]
SWEEP_NAME = "scale"


class ScaleSettings(BaseModel):
    """``--set`` keys of ``bench scale``."""

    model_config = ConfigDict(extra="forbid")
    axis: Literal["gpu", "cpu"] = "gpu"  # gpu: N GPUs; cpu: N slots of cpus_per_trial cores, no GPU
    counts: list[Int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)  # one sweep each, in order
    tasks: list[str] = Field(default_factory=lambda: ["hammer", "push-wall", "faucet-close", "push-back"],
                             min_length=1)
    # one grid point per method (cw10.yaml's grids narrowed to a point, so every trial is comparable)
    methods: dict[str, dict[str, Any]] = Field(default_factory=lambda: {
        "full": {"lr": 1.0e-4}, "lora": {"r": 8, "lr": 4.0e-4}, "dora": {"r": 8, "lr": 4.0e-4},
        "vera": {"r": 256, "lr": 1.0e-3}}, min_length=1)
    seeds: list[Int] = Field(default_factory=lambda: [0, 1], min_length=1)
    steps: Int = Field(1000, ge=1)  # fine-tuning updates per trial
    eval_episodes: Int = Field(2, ge=1)
    batch_size: Int = Field(128, ge=1)
    gpus_per_trial: Float | Literal["auto"] = "auto"  # as the sweeps: up to 4 trials per GPU, spread
    cpus_per_trial: Int = Field(4, ge=1)
    # seconds between the first trials' starts on a GPU, as the sweeps' resources.start_stagger_s (0: together)
    start_stagger_s: Float | Literal["auto"] = 0.0
    # the pretrained DT every trial starts from: the paper's shape, briefly pretrained (it is built once)
    pretrain_tasks: list[str] = Field(default_factory=lambda: ["reach", "door-open", "drawer-close"], min_length=1)
    pretrain_steps: Int = Field(2000, ge=0)
    data_episodes: Int = Field(20, ge=1)
    compile: Bool = True
    deterministic: Bool = True  # torch's deterministic kernels, so rows can match bit for bit across counts
    # a wave's next trial in a finished trial's process (Tune's reuse_actors; harness/process_cache.py);
    # None: the sweep's own default (on)
    reuse_actors: Bool | None = None
    settings: dict[str, Any] = Field(default_factory=dict)  # more RL track settings (the tests' tiny DT)
    workdir: str | None = None  # sweep files, results and boards per count (default: a temporary folder)

    @field_validator("counts")
    @classmethod
    def _positive(cls, counts: list[int]) -> list[int]:
        if any(n < 1 for n in counts):
            raise ValueError(f"counts must be >= 1, got {counts}")
        return counts


def sweep_doc(s: ScaleSettings) -> dict[str, Any]:
    """The sweep file every count runs."""
    on_gpu = s.axis == "gpu"
    settings = {"n_layer": 4, "n_head": 8, "n_embd": 512, "context": 50, "data_episodes": s.data_episodes,
                "pretrain_tasks": s.pretrain_tasks, "pretrain_steps": s.pretrain_steps, "pretrain_eval_episodes": 0,
                "eval_pretrained": False, "compile": s.compile, "deterministic": s.deterministic,
                "device": "auto" if on_gpu else "cpu", **s.settings}
    return {"name": SWEEP_NAME, "track": "rl", "benchmark": "cw10", "tasks": list(s.tasks), "protocol": "grid",
            "seeds": list(s.seeds), "leaderboard": SWEEP_NAME,
            "budget": {"steps": s.steps, "eval_episodes": s.eval_episodes, "batch_size": s.batch_size},
            "settings": settings,
            "resources": {"cpus_per_trial": s.cpus_per_trial, "gpus_per_trial": s.gpus_per_trial if on_gpu else 0,
                          "start_stagger_s": s.start_stagger_s},
            "methods": {m: {k: [v] for k, v in point.items()} for m, point in s.methods.items()}}


def check(s: ScaleSettings, sweep_path: Path) -> int:
    """Everything that can be wrong, before any compute; returns the number of trials per count."""
    sweep = load_sweep(sweep_path, confirmed=True)  # the generated file gets the sweep's own validation and messages
    trials = len(study_trials(sweep.studies[0], "final"))
    if s.axis == "gpu":
        visible = visible_gpus()
        if max(s.counts) > visible:
            raise ConfigError(f"bench scale: counts {s.counts} need {max(s.counts)} GPUs, but {visible} are visible "
                              f"(CUDA_VISIBLE_DEVICES {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use counts up "
                              f"to {visible}, or axis=cpu on a machine without GPUs")
    else:
        most = max(s.counts) * s.cpus_per_trial
        if most > host_cpus():
            raise ConfigError(f"bench scale: axis=cpu with counts {s.counts} x cpus_per_trial {s.cpus_per_trial} "
                              f"needs {most} cores; this machine lets it use {host_cpus()}")
    return trials


def _records(results: Path) -> list[dict[str, Any]]:
    path = results / SWEEP_NAME / f"{SWEEP_NAME}-records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _entry(row: Any, key: list[str]) -> str:
    return " ".join(str(row[k]) for k in key if str(row[k]))


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def compare_boards(first: Path, other: Path, examples: int = 3) -> dict[str, Any]:
    """``other``'s leaderboard rows against ``first``'s: results apart from measurements.

    Returns ``results_identical`` (every row present in both, every result column equal; NaN equals NaN),
    ``result_differences`` (one line per differing row and result column) and ``measurement_differences``:
    per measurement column (:func:`harness.trial.is_measurement`) that differs, how many rows differ, the
    largest absolute and relative difference (numbers) and a few examples. Measurements differing is no
    failed comparison: memory and time vary between runs of the same computation."""
    import pandas as pd

    from harness.leaderboard import ROW_KEY, keyed  # heavy: harness.leaderboard imports pandas

    key = ROW_KEY
    a, b = (keyed(pd.read_csv(p), key).sort_values(key).reset_index(drop=True) for p in (first, other))
    results: list[str] = []
    if set(a.columns) != set(b.columns):
        results.append(f"columns differ: {sorted(set(a.columns) ^ set(b.columns))}")
    if a[key].values.tolist() != b[key].values.tolist():
        results.append(f"rows differ: {a[key].values.tolist()} vs {b[key].values.tolist()}")
    measurements: dict[str, Any] = {}
    if not results:
        for col in a.columns:
            same = (a[col] == b[col]) | (a[col].isna() & b[col].isna())
            rows = (~same).to_numpy().nonzero()[0]
            if not len(rows):
                continue
            lines = [f"{_entry(a.iloc[i], key)}: {col} {_plain(a.at[i, col])!r} vs {_plain(b.at[i, col])!r}"
                     for i in rows]
            if not is_measurement(col):
                results.extend(lines)
                continue
            entry: dict[str, Any] = {"rows": int(len(rows))}
            if pd.api.types.is_numeric_dtype(a[col]) and pd.api.types.is_numeric_dtype(b[col]):
                x, y = a[col].iloc[rows].astype(float), b[col].iloc[rows].astype(float)
                diff = (y - x).abs()
                entry["max_abs_diff"] = round(float(diff.max()), 6)
                rel = diff / x.abs().where(x != 0)
                if rel.notna().any():
                    entry["max_rel_diff"] = round(float(rel.max()), 6)
            entry["examples"] = lines[:examples]
            measurements[col] = entry
    return {"results_identical": not results, "result_differences": results,
            "measurement_differences": measurements}


def board_differences(first: Path, other: Path) -> list[str]:
    """How ``other``'s rows differ from ``first``'s in their results (measurements apart); [] if none."""
    return compare_boards(first, other)["result_differences"]


def _concurrency(spans: list[tuple[float, float]]) -> Iterator[tuple[float, int]]:
    """(seconds, how many of ``spans`` were open) for each piece between consecutive starts and ends; a span
    that ends where another starts is not open beside it."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now, last = 0, events[0][0] if events else 0.0
    for t, delta in events:
        yield t - last, now
        now, last = now + delta, t


def _most_concurrent(spans: list[tuple[float, float]]) -> int:
    return max((open_ for _, open_ in _concurrency(spans)), default=0)


def _extra(r: dict[str, Any]) -> dict[str, Any]:
    return json_field(r.get("extra"))


def summarise(count: int, records: list[dict[str, Any]], s: ScaleSettings, monitor: GpuMonitor | None,
              sweep_wall_s: float, resumed_since: float | None = None) -> dict[str, Any]:
    """One count's figures from its trial records (and the GPU samples taken meanwhile).

    ``resumed_since``: the unix time at which this call continued a count an earlier call left unfinished
    (None: the count ran in this call alone). Such a count is marked ``comparable: false`` (see the
    module's doc) and its ``resumed_call`` figures count only the trials that started in this call, and of
    each only the updates done in it (those after the checkpoint it continued from)."""
    ok = [r for r in records if r.get("status") == "ok"]
    spans = []
    gpus_used: dict[str, int] = {}
    for r in ok:
        extra = _extra(r)
        start = float(extra["started_at"])
        spans.append((start, start + float(r["wall_time_s"])))
        ray = (extra.get("placement") or {}).get("ray") or {}
        for gpu in ray.get("gpu_ids") or []:
            gpus_used[str(gpu)] = gpus_used.get(str(gpu), 0) + 1
    start, end = (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (0.0, 0.0)
    # time in which at least one finished trial ran: a count finished over several calls (a time limit
    # between them) leaves out the pause, and equals end - start otherwise
    span = busy_seconds(spans)
    updates = len(ok) * s.steps
    out: dict[str, Any] = {
        "count": count, "axis": s.axis, "trials": len(records), "ok": len(ok), "updates": updates,
        "span_s": round(span, 2), "first_start_to_last_end_s": round(end - start, 2),
        "sweep_wall_s": round(sweep_wall_s, 2),
        "updates_per_s": round(updates / span, 2) if span > 0 else None,
        "trials_per_hour": round(len(ok) / span * 3600, 1) if span > 0 else None,
        "most_trials_at_once": _most_concurrent(spans), "trials_per_gpu": dict(sorted(gpus_used.items())),
        "mean_trial_wall_s": round(sum(b - a for a, b in spans) / len(spans), 2) if spans else None,
        "comparable": resumed_since is None}
    if resumed_since is not None:
        out["comparable_reason"] = (
            "this count was cut by a time limit and resumed: trials killed by the cut had done updates that no "
            "record shows and that their retries did again, and the time in which only they ran is outside the "
            "span, so updates/s here is not the rate of an uninterrupted count (run the count within one call, "
            "e.g. with fewer tasks or steps, for a comparable figure); resumed_call holds the resumed call's own")
        here = [(r, a, b) for r, (a, b) in zip(ok, spans) if a >= resumed_since]
        done = sum(s.steps - int(_extra(r).get("resumed_from_update", 0)) for r, _, _ in here)
        call_span = busy_seconds([(a, b) for _, a, b in here])
        out["resumed_call"] = {
            "since": round(resumed_since, 3), "trials": len(here), "updates": done, "span_s": round(call_span, 2),
            "updates_per_s": round(done / call_span, 2) if call_span > 0 else None,
            "trials_from_earlier_calls": len(ok) - len(here)}
    breakdown = time_breakdown(ok, span)
    if breakdown is not None:
        out["time_breakdown"] = breakdown
    steady = _steady_rate(ok)
    if steady is not None and out["updates_per_s"]:
        # issue 20 item 4's yardstick, "four long trials' steady rate", read from this count's own trials:
        # as many at once as ran, each at its steady (after-warm-up) rate
        out["steady_updates_per_s_at_once"] = round(steady * out["most_trials_at_once"], 2)
        out["updates_per_s_over_steady"] = round(out["updates_per_s"] / out["steady_updates_per_s_at_once"], 3)
        overlap = steady_overlap_share(ok, out["most_trials_at_once"])
        if overlap is not None:
            # how far that yardstick is "as many trials training at once": near 1 when they trained side by
            # side; low when each trained beside others' start-up or evaluation (staggered or drifting
            # trials), whose steady rate is then higher than four training at once would give
            out["steady_overlap_share"] = overlap
    if monitor is not None and monitor.samples and span > 0:
        lo = start if resumed_since is None else max(start, resumed_since)  # the samples are this call's
        per_gpu = monitor.per_gpu(lo, end)
        used = [int(g) for g in gpus_used] or None
        out["gpu"] = {str(i): v for i, v in per_gpu.items()}
        out["gpu_utilisation_pct"] = monitor.mean_between(lo, end, used)
    return out


def _steady_rate(records: list[dict[str, Any]]) -> float | None:
    """One trial's steady updates/s over ``records``: their steady updates (``extra.timing.steady_s`` at
    each record's ``ms_per_update``, the steady milliseconds per update) over their steady seconds. None
    where no record has both."""
    updates = seconds = 0.0
    for r in records:
        steady_s = float((_extra(r).get("timing") or {}).get("steady_s", 0.0))
        ms = float(r.get("ms_per_update") or 0.0)
        if steady_s > 0 and ms > 0:
            updates += 1000.0 * steady_s / ms
            seconds += steady_s
    return updates / seconds if seconds > 0 else None


def steady_overlap_share(records: list[dict[str, Any]], at_once: int) -> float | None:
    """The share of the trials' steady seconds (after their first updates, to their last update:
    ``extra.timing.training_span`` and ``first_updates_s``) during which ``at_once`` or more trials were in
    their steady phase. None where no record has both."""
    windows = []
    for r in records:
        timing = _extra(r).get("timing") or {}
        span = timing.get("training_span")
        if span and len(span) == 2:
            start = float(span[0]) + float(timing.get("first_updates_s", 0.0))
            if float(span[1]) > start:
                windows.append((start, float(span[1])))
    if not windows or at_once < 1:
        return None
    pieces = [(seconds * open_, open_ >= at_once) for seconds, open_ in _concurrency(windows)]
    total = sum(trial_s for trial_s, _ in pieces)  # each steady trial's seconds, piece by piece
    return round(sum(trial_s for trial_s, full in pieces if full) / total, 3) if total > 0 else None


def _comparable(run: dict[str, Any]) -> bool:
    """Whether a count ran uninterrupted (a run kept from before ``comparable`` existed: not resumed)."""
    return bool(run.get("comparable", not run.get("resumed", True)))


def _finished_runs(partial: Path, s: ScaleSettings) -> list[dict[str, Any]]:
    """The counts an earlier call of the same command finished (same settings, same leading counts)."""
    if not partial.is_file():
        return []
    earlier = json.loads(partial.read_text())
    if earlier.get("settings") != s.model_dump():
        raise ConfigError(f"bench scale: {partial.parent} holds a run with other settings; give a fresh workdir, "
                          "or the same --set values to continue it")
    runs = earlier.get("runs", [])
    return [r for i, r in enumerate(runs) if i < len(s.counts) and r["count"] == s.counts[i]]


def bench_scale(overrides: dict[str, Any]) -> dict[str, Any]:
    """The sweep's throughput at every count, its scaling efficiency and whether the rows stayed the same."""
    s = validate(ScaleSettings, overrides, "bench scale", "bench setting")
    work = Path(s.workdir) if s.workdir else Path(tempfile.mkdtemp(prefix="harness-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    # a workdir holding another run is refused before anything in it is written or built
    done = _finished_runs(work / "partial.json", s)
    sweep_path = work / f"{SWEEP_NAME}.yaml"
    sweep_path.write_text(yaml.safe_dump(sweep_doc(s), sort_keys=False))
    trials = check(s, sweep_path)
    print(f"[bench scale] {trials} trials per count, counts {s.counts} ({s.axis}); work in {work}", file=sys.stderr,
          flush=True)

    # data and the pretrained DT once, outside every count's timing
    settings = sweep_doc(s)["settings"]
    started = time.time()
    prep = [sys.executable, "-m", "harness", "pretrain", "rl"]
    for k, v in settings.items():
        prep += ["--set", f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) else v}"]
    # every count kept from an earlier call: nothing runs, so nothing needs preparing (prepare_s 0)
    if len(done) < len(s.counts) and run_logged(prep, work / "prepare.log") != 0:
        raise RuntimeError(f"bench scale: preparing the data and the pretrained DT failed; see {work / 'prepare.log'}")
    prepare_s = time.time() - started

    runs: list[dict[str, Any]] = []
    for i, n in enumerate(s.counts):
        if i < len(done):  # finished by an earlier call of the same command
            print(f"[bench scale] {n} {s.axis}(s): kept from an earlier call", file=sys.stderr, flush=True)
            runs.append(done[i])
            continue
        folder = work / f"{i}-{s.axis}{n}"
        folder.mkdir(exist_ok=True)
        resumed = (folder / "results" / SWEEP_NAME).exists()  # an earlier call stopped inside this count
        cmd = [sys.executable, "-m", "harness", "sweep", str(sweep_path), "--results", str(folder / "results"),
               "--leaderboard", str(folder / "board"), "--no-dashboard", *(["--resume"] if resumed else [])]
        cmd += ["--gpus", str(n)] if s.axis == "gpu" else ["--gpus", "0", "--cpus", str(n * s.cpus_per_trial)]
        started = time.time()
        with GpuMonitor() as monitor:
            code = run_logged(cmd, folder / ("sweep-resumed.log" if resumed else "sweep.log"),
                              {} if s.reuse_actors is None else {REUSE_ENV: "1" if s.reuse_actors else "0"})
        wall = time.time() - started
        if code not in (0, 1):  # 1: some trials failed, which the figures say; others: nothing ran
            raise RuntimeError(f"bench scale: the sweep on {n} {s.axis}(s) exited {code}; see {folder / 'sweep.log'}")
        run = summarise(n, _records(folder / "results"), s, monitor, wall, started if resumed else None)
        run["board"], run["resumed"] = str(folder / "board" / f"{SWEEP_NAME}.csv"), resumed
        runs.append(run)
        # what is finished survives a run cut short (a time limit between counts)
        atomic_write_text(work / "partial.json", json.dumps({"settings": s.model_dump(), "runs": runs}, indent=1))
        idle = (run.get("time_breakdown") or {}).get("idle_share")
        print(f"[bench scale] {n} {s.axis}(s): {run['updates_per_s']} updates/s, {run['trials_per_hour']} trials/h, "
              f"GPU utilisation {run.get('gpu_utilisation_pct')}%, no trial training {idle}, "
              f"{run.get('updates_per_s_over_steady')} of the trials' steady rate at once (they trained that many at "
              f"once {run.get('steady_overlap_share')} of their steady time)"
              + ("" if run["comparable"] else " (resumed after a cut: not comparable)"), file=sys.stderr, flush=True)

    base = runs[0]
    for run in runs:
        # per device against the first count's per device: 1.0 is perfect scaling; only between counts that
        # each ran uninterrupted (a resumed count's rate is not an uninterrupted one's)
        comparable = _comparable(run) and _comparable(base)
        run["scaling_efficiency"] = round((run["updates_per_s"] / run["count"])
                                          / (base["updates_per_s"] / base["count"]), 3) \
            if comparable and base["updates_per_s"] and run["updates_per_s"] else None
        if not comparable:
            which = "this count" if not _comparable(run) else f"the first count ({base['count']})"
            run["scaling_efficiency_note"] = f"not computed: {which} was resumed after a cut, see comparable_reason"
        comparison = compare_boards(Path(base["board"]), Path(run["board"]))
        run["results_identical"] = comparison["results_identical"]
        run["result_differences"] = comparison["result_differences"][:20]
        run["measurement_differences"] = comparison["measurement_differences"]
    return {"settings": s.model_dump(), "trials_per_count": trials, "prepare_s": round(prepare_s, 1),
            "workdir": str(work), "runs": runs}


__all__ = ["ScaleSettings", "bench_scale", "board_differences", "compare_boards", "summarise", "sweep_doc",
           "time_breakdown"]

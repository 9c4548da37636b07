"""``bench scale`` on the CPU: the same sweep over 1 and 2 slots of real Ray Tune trials, its figures, and
the leaderboard rows that must not change with the number of devices (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY_DT = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "noise_levels": [0.0, 0.5],
           "eval_workers": 1, "data_workers": 1, "compile": False}
# two trials a count: enough for two slots to run side by side and for a cut to strike between a finished
# trial and a held one; a count's time is mostly its command's start (Python, Ray), not its trials
SMALL = {"axis": "cpu", "cpus_per_trial": 1, "tasks": ["window-close"], "seeds": [0],
         "methods": {"full": {"lr": 1.0e-3}, "lora": {"r": 4, "lr": 1.0e-3}}, "steps": 30, "eval_episodes": 1,
         "batch_size": 8, "pretrain_tasks": ["reach"], "pretrain_steps": 10, "data_episodes": 2, "settings": TINY_DT}


COUNTS = [1, 2, 1]  # one slot, two, and one again: the last is the count a time limit cuts
TRIALS = 2  # 1 task x 2 methods x 1 seed
CUT = "2-cpu1/results/scale/scale-final/window-close_lora_lr0.001-r4_s0_"  # its grid's second (last) trial


@dataclass(frozen=True)
class ScaleCalls:
    """``bench scale`` over COUNTS as a user runs it, cut by a time limit in the last count and resumed."""

    tmp: Path
    work: Path
    cut_finished: int  # trials of the cut count with a final record when the cut struck
    cut_records_file: bool  # whether the cut count had written its records file
    partial_counts: list[int]  # the counts that partial.json held after the cut
    resumed: subprocess.CompletedProcess  # the same command again
    doc: dict  # its --out JSON


@pytest.fixture(scope="module")
def scale_calls(tmp_path_factory) -> ScaleCalls:
    """The command over three counts of the same sweep. In the third count the grid's second trial waits after
    its first update (a test hook), and the command's whole process group is killed then (as a time limit
    kills it), with the count's first trial finished and the first two counts done, whatever the machine's
    speed; the same command again keeps the two counts and resumes the third."""
    import os
    import signal
    import time

    from harness.tune_trial import PAUSE_TRIAL, PAUSED_MARKER

    tmp = tmp_path_factory.mktemp("scale")
    work, out = tmp / "w", tmp / "scale.json"
    sets = [f"{k}={json.dumps(v)}" for k, v in {**SMALL, "counts": COUNTS, "workdir": str(work)}.items()]
    cmd = [sys.executable, "-m", "harness", "bench", "scale", *sum((["--set", s] for s in sets), []), "--out", str(out)]
    env = {**os.environ, "HARNESS_CACHE": str(tmp / "cache")}
    env.pop("RAY_ADDRESS", None)
    experiment = work / "2-cpu1" / "results" / "scale"

    def finished() -> int:  # trials whose final record Tune has (the records file is written at the end)
        return sum('"record": ' in f.read_text() for f in experiment.glob("*/*/result.json"))

    cut = subprocess.Popen(cmd, cwd=ROOT, env={**env, PAUSE_TRIAL: CUT}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 500
        # the held trial waits ten minutes: time enough for Tune to write the one before it as finished
        while time.time() < deadline and cut.poll() is None and not (
                list(experiment.glob(f"*/*/{PAUSED_MARKER}")) and finished() >= 1):
            time.sleep(0.5)
        assert cut.poll() is None, f"the command ended (exit {cut.poll()}) before it could be cut"
        (paused,) = experiment.glob(f"*/*/{PAUSED_MARKER}")
        assert CUT in f"{paused.parent}/", paused
        time.sleep(2.0)  # Tune's experiment state has the finished trial by now
    finally:
        os.killpg(cut.pid, signal.SIGKILL)
        cut.wait()
    partial = json.loads((work / "partial.json").read_text())
    cut_state = (finished(), (experiment / "scale-records.jsonl").exists(), [r["count"] for r in partial["runs"]])
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return ScaleCalls(tmp, work, *cut_state, resumed, json.loads(out.read_text()))


@pytest.mark.slow
def test_one_sweep_over_one_and_two_slots(scale_calls, monkeypatch):
    doc = scale_calls.doc
    assert doc["bench"] == "scale" and doc["command"].startswith("python -m harness bench scale")
    result = doc["result"]
    one, two, _ = result["runs"]  # the third: test_a_count_cut_by_a_time_limit_and_resumed_is_marked_not_comparable
    assert result["trials_per_count"] == TRIALS
    for run, count in ((one, 1), (two, 2)):
        assert (run["count"], run["trials"], run["ok"], run["updates"]) == (count, TRIALS, TRIALS, TRIALS * SMALL["steps"])
        assert run["most_trials_at_once"] == count  # the trials really ran side by side on two slots
        assert run["updates_per_s"] == pytest.approx(run["updates"] / run["span_s"], rel=0.01)
        assert run["trials_per_hour"] == pytest.approx(TRIALS / run["span_s"] * 3600, rel=0.01)
    assert one["comparable"] and two["comparable"] and "resumed_call" not in two
    assert one["scaling_efficiency"] == 1.0
    assert two["scaling_efficiency"] == pytest.approx(two["updates_per_s"] / 2 / one["updates_per_s"], abs=0.002)
    # same seeds and settings: the results match whatever the slots; measurements are reported apart
    assert one["results_identical"] and two["results_identical"], two["result_differences"]
    assert one["measurement_differences"] == {} and "wall_time_s" in two["measurement_differences"]
    # where the trials' time went: every trial's phases, summed
    for run in (one, two):
        breakdown = run["time_breakdown"]
        assert breakdown["trials"] == TRIALS and breakdown["phases_s"]["steady_s"] > 0
        assert sum(breakdown["phases_s"].values()) == pytest.approx(breakdown["trial_s"], abs=0.1)
        assert 0.0 < breakdown["idle_share"] < 1.0  # trials spend time outside their updates
    a, b = pd.read_csv(one["board"]), pd.read_csv(two["board"])
    assert len(a) == 2 and a["success_mean"].tolist() == b["success_mean"].tolist()
    # every trial ran in its own 1-core slot, without a GPU
    records = [json.loads(line) for line in (Path(result["workdir"]) / "1-cpu2" / "results" / "scale"
                                            / "scale-records.jsonl").read_text().splitlines()]
    for r in records:
        placement = json.loads(r["extra"])["placement"]
        assert placement["cpus"] == 1 and placement["device"] == "cpu" and placement["ray"]["gpus"] == 0.0
    # the same command again keeps what is finished; other settings in that folder are refused
    from agents.bench_scale import bench_scale

    overrides = {**SMALL, "counts": COUNTS, "workdir": str(scale_calls.work)}
    monkeypatch.setenv("HARNESS_CACHE", str(scale_calls.tmp / "cache"))
    monkeypatch.setattr("agents.bench_scale.run_logged", lambda *a, **k: pytest.fail(f"ran {a[0]} again"))
    again = bench_scale(overrides)
    assert [r["updates_per_s"] for r in again["runs"]] == [r["updates_per_s"] for r in result["runs"]]
    with pytest.raises(ConfigError, match="holds a run with other settings"):
        bench_scale({**overrides, "steps": 31})


def test_throughput_counts_only_the_time_trials_ran():
    from agents.bench_scale import ScaleSettings, summarise

    def record(start, wall):
        return {"status": "ok", "wall_time_s": wall, "extra": json.dumps({"started_at": start})}

    # two trials side by side, a pause of 100 s (a time limit), then one more
    run = summarise(2, [record(0.0, 10.0), record(5.0, 10.0), record(115.0, 5.0)], ScaleSettings(steps=100), None, 0)
    assert run["span_s"] == 20.0 and run["first_start_to_last_end_s"] == 120.0
    assert run["updates_per_s"] == 15.0 and run["most_trials_at_once"] == 2
    assert "steady_updates_per_s_at_once" not in run  # records without a timing: no steady figure


def test_throughput_is_set_against_the_trials_own_steady_rate():
    """Issue 20 item 4's second target (aggregate within 0.8 of the steady rate of as many long trials) from
    the count's own records: steady updates (steady seconds at the steady ms/update) over steady seconds,
    times the most trials that ran at once."""
    from agents.bench_scale import ScaleSettings, summarise

    def record(start, wall, steady_s, ms):
        return {"status": "ok", "wall_time_s": wall, "ms_per_update": ms,
                "extra": json.dumps({"started_at": start, "timing": {"steady_s": steady_s, "total_s": wall}})}

    # two trials at once for 10 s, 100 updates each; steady: 8 s at 80 ms and 4 s at 40 ms (100 updates each)
    run = summarise(2, [record(0.0, 10.0, 8.0, 80.0), record(0.0, 10.0, 4.0, 40.0)], ScaleSettings(steps=100), None, 0)
    assert run["updates_per_s"] == 20.0
    assert run["steady_updates_per_s_at_once"] == round(2 * 200 / 12.0, 2)
    assert run["updates_per_s_over_steady"] == round(20.0 / round(400 / 12.0, 2), 3)


def test_boards_compare_results_and_report_measurements_apart(tmp_path):
    from agents.bench_scale import board_differences, compare_boards

    rows = pd.DataFrame({"method": ["full", "lora"], "task": ["t", "t"], "success_mean": [0.5, 0.25],
                         "trainable_params": [100, 10], "settings": ['{"r": 4}', '{"r": 4}'],
                         "wall_time_s": [10.0, 12.0], "ms_per_update": [3.0, 4.0], "peak_memory_mb": [2344.1, 2124.0],
                         "train_reserved_memory_mb": [2530.0, 2244.0], "date": ["d1", "d1"], "git_commit": ["a", "a"]})
    rows.to_csv(tmp_path / "a.csv", index=False)
    # this week's 2-GPU run: equal scores, memory a few MB apart, other times, dates and commits
    rows.assign(wall_time_s=[99.0, 1.0], ms_per_update=[9.0, 9.0], peak_memory_mb=[2347.1, 2124.0],
                train_reserved_memory_mb=[2460.0, 2232.0], date=["d2", "d2"], git_commit=["b", "b"]).iloc[::-1].to_csv(
        tmp_path / "b.csv", index=False)
    same = compare_boards(tmp_path / "a.csv", tmp_path / "b.csv")
    assert same["results_identical"] and same["result_differences"] == []
    measured = same["measurement_differences"]
    assert set(measured) == {"wall_time_s", "ms_per_update", "peak_memory_mb", "train_reserved_memory_mb", "date",
                             "git_commit"}
    assert measured["peak_memory_mb"]["rows"] == 1 and measured["peak_memory_mb"]["max_abs_diff"] == pytest.approx(3.0)
    assert measured["peak_memory_mb"]["examples"] == ["full t: peak_memory_mb 2344.1 vs 2347.1"]
    assert measured["train_reserved_memory_mb"]["max_rel_diff"] == pytest.approx(70 / 2530, abs=1e-6)
    assert measured["date"]["rows"] == 2 and "max_abs_diff" not in measured["date"]
    # a result differing fails the comparison, whatever the measurements do
    rows.assign(success_mean=[0.5, 0.3], trainable_params=[100, 11]).to_csv(tmp_path / "c.csv", index=False)
    other = compare_boards(tmp_path / "a.csv", tmp_path / "c.csv")
    assert not other["results_identical"] and other["measurement_differences"] == {}
    assert other["result_differences"] == ["lora t: success_mean 0.25 vs 0.3", "lora t: trainable_params 10 vs 11"]
    assert board_differences(tmp_path / "a.csv", tmp_path / "c.csv") == other["result_differences"]
    rows.drop(columns="trainable_params").to_csv(tmp_path / "d.csv", index=False)
    assert compare_boards(tmp_path / "a.csv", tmp_path / "d.csv")["result_differences"] == [
        "columns differ: ['trainable_params']"]


def test_measurement_columns_are_one_list():
    from harness.trial import MEASUREMENT_FIELDS, TrialRecord, is_measurement

    fields = set(TrialRecord.__dataclass_fields__)
    assert set(MEASUREMENT_FIELDS) <= fields  # names of the record's own fields, which boards keep
    assert is_measurement("peak_memory_mb") and is_measurement("ms_per_update") and is_measurement("git_commit")
    assert is_measurement("wall_time_s_mean") and not is_measurement("success_mean")
    assert not any(is_measurement(c) for c in ("trainable_params", "adapter_bytes", "settings", "targets", "seed"))


def test_a_resumed_count_is_not_compared_as_if_uninterrupted():
    from agents.bench_scale import ScaleSettings, summarise

    def record(start, wall, resumed_from=0):
        extra = {"started_at": start, **({"resumed_from_update": resumed_from} if resumed_from else {})}
        return {"status": "ok", "wall_time_s": wall, "extra": json.dumps(extra)}

    # call 1: two trials finish (a third was killed by the limit, unseen); call 2 at t=200: the killed one
    # again from its checkpoint at update 40, and a fourth from the start
    records = [record(0.0, 10.0), record(5.0, 10.0), record(200.0, 6.0, resumed_from=40), record(201.0, 10.0)]
    run = summarise(2, records, ScaleSettings(steps=100), None, 0, resumed_since=200.0)
    assert run["comparable"] is False and "cut by a time limit" in run["comparable_reason"]
    assert run["resumed_call"] == {"since": 200.0, "trials": 2, "updates": 60 + 100, "span_s": 11.0,
                                   "updates_per_s": round(160 / 11.0, 2), "trials_from_earlier_calls": 2}
    assert summarise(2, records, ScaleSettings(steps=100), None, 0)["comparable"] is True


def test_impossible_counts_are_refused_before_any_compute(tmp_path):
    from agents.bench_scale import bench_scale
    from harness.placement import host_cpus

    work = tmp_path / "w"
    with pytest.raises(ConfigError, match="needs .* cores; this machine lets it use"):
        bench_scale({**SMALL, "counts": [host_cpus() + 1], "workdir": str(work)})
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="need 1 GPUs, but 0 are visible"):
            bench_scale({**SMALL, "axis": "gpu", "counts": [1], "workdir": str(work)})
    with pytest.raises(ConfigError, match="nosuch"):
        bench_scale({**SMALL, "methods": {"nosuch": {}}, "workdir": str(work)})
    with pytest.raises(ConfigError, match="counts"):
        bench_scale({**SMALL, "counts": [0]})
    assert not (work / "prepare.log").exists()  # nothing was built or run


def test_gpu_monitor_reads_nvidia_smi_lines():
    from harness.gpu_monitor import GpuMonitor, GpuSample, parse_line

    assert parse_line("3, 87, 40500", 1.0) == GpuSample(1.0, 3, 87.0, 40500.0)
    assert parse_line("0, [N/A], 10", 1.0) is None and parse_line("garbage", 1.0) is None
    m = GpuMonitor()
    m.samples = [GpuSample(1.0, 0, 50.0, 10.0), GpuSample(2.0, 0, 100.0, 30.0), GpuSample(2.0, 1, 20.0, 5.0),
                 GpuSample(9.0, 1, 90.0, 5.0)]
    assert m.per_gpu(0.0, 5.0) == {0: {"utilisation_pct": 75.0, "peak_memory_used_mib": 30.0},
                                   1: {"utilisation_pct": 20.0, "peak_memory_used_mib": 5.0}}
    assert m.mean_between(0.0, 5.0) == 47.5 and m.mean_between(0.0, 5.0, [1]) == 20.0
    assert m.mean_between(20.0, 30.0) is None


def test_a_tiny_rl_trial_records_where_its_time_went(tmp_path, monkeypatch):
    """extra.timing: every phase of the trial, none negative, together its wall time (issue 20 item 4)."""
    from harness.finetune import PHASES
    from harness.trial import TrialSpec
    from harness.finetune import run_trial

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    settings = {**TINY_DT, "data_episodes": 2, "pretrain_tasks": ["reach"], "pretrain_steps": 5,
                "pretrain_eval_episodes": 0, "device": "cpu"}
    spec = TrialSpec("rl", "cw10", "window-close", "lora", {"r": 2}, seed=0,
                     budget={"steps": 40, "eval_episodes": 1, "batch_size": 4}, track_settings=settings)
    record = run_trial(spec, report=lambda metrics: None)
    assert record.status == "ok", record.error
    timing = record.extra["timing"]
    assert set(timing) >= {f"{p}_s" for p in PHASES} | {"total_s", "training_span"}
    assert all(timing[f"{p}_s"] >= 0 for p in PHASES)
    # the phases partition the trial: together they are its wall time (rounding apart)
    assert sum(timing[f"{p}_s"] for p in PHASES) == pytest.approx(timing["total_s"], abs=0.01)
    assert timing["total_s"] == pytest.approx(record.wall_time_s, abs=0.05)
    # the wrap's parts, beside the phases: the method's wrap, the move to the device, the trainer
    detail = timing["detail"]
    assert set(detail) == {"wrap_method_s", "wrap_to_device_s", "wrap_trainer_s"}
    assert all(v >= 0 for v in detail.values()) and sum(detail.values()) <= timing["wrap_s"] + 0.01
    # the real work shows where it happened: data and base model, updates, the rollout
    assert timing["setup_s"] > 0 and timing["steady_s"] > 0 and timing["first_updates_s"] > 0
    assert timing["eval_s"] >= record.extra["eval_wall_s"] - 0.01
    assert record.extra["eval_groups"] == 2  # rollout_groups auto, outside Ray: the GPU is nobody else's
    # the steady updates are the ones ms_per_update times (the first 8 of 40 are warm-up)
    assert timing["steady_s"] == pytest.approx(32 * record.ms_per_update / 1000, rel=0.25, abs=0.05)
    start, end = timing["training_span"]
    assert record.extra["started_at"] < start < end < record.extra["started_at"] + record.wall_time_s
    assert timing["process_to_trial_s"] >= 0  # this test's own process started before the trial


@pytest.mark.slow
def test_a_count_cut_by_a_time_limit_and_resumed_is_marked_not_comparable(scale_calls):
    """A time limit kills the whole command (as the device tool does: its process group) after some trials of
    a count finished; the same command again keeps the counts finished before and resumes the cut one, whose
    figures then say they are not comparable."""
    calls = scale_calls
    assert calls.cut_finished == 1 and not calls.cut_records_file
    assert calls.partial_counts == COUNTS[:2]  # the finished counts survived the cut
    assert calls.resumed.stderr.count("kept from an earlier call") == 2, calls.resumed.stderr[-3000:]
    one, two, run = calls.doc["result"]["runs"]
    assert run["resumed"] and run["ok"] == TRIALS and run["comparable"] is False
    assert run["scaling_efficiency"] is None and "resumed after a cut" in run["scaling_efficiency_note"]
    assert one["comparable"] and two["comparable"] and two["scaling_efficiency"] is not None  # unaffected
    resumed = run["resumed_call"]
    assert resumed["trials_from_earlier_calls"] >= 1 and resumed["trials"] == TRIALS - resumed["trials_from_earlier_calls"]
    assert resumed["updates"] == resumed["trials"] * SMALL["steps"]  # none had a checkpoint: all from update 0
    assert resumed["updates_per_s"] == pytest.approx(resumed["updates"] / resumed["span_s"], rel=0.01)
    assert "not comparable" in calls.resumed.stderr
    assert run["results_identical"], run["result_differences"]  # a resumed count's rows are the same rows


def test_the_steady_yardstick_says_how_much_the_trials_trained_side_by_side():
    """Staggered or drifting trials train beside others' start-up and evaluation, so their steady rate
    overstates "as many trials training at once" (H200, 2026-12-04): the share of steady seconds in which
    that many trained says how far the yardstick holds."""
    from agents.bench_scale import steady_overlap_share

    def record(span, first):
        return {"status": "ok", "extra": json.dumps({"timing": {"training_span": span, "first_updates_s": first}})}

    together = [record([0.0, 10.0], 1.0), record([0.0, 10.0], 1.0)]
    assert steady_overlap_share(together, 2) == 1.0
    # steady 1-10 and 6-15: both train 6-10, 4 s of each trial's 9 s
    apart = [record([0.0, 10.0], 1.0), record([5.0, 15.0], 1.0)]
    assert steady_overlap_share(apart, 2) == round(8 / 18, 3)
    assert steady_overlap_share(apart, 1) == 1.0
    assert steady_overlap_share([{"status": "ok", "extra": "{}"}], 2) is None

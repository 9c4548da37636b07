"""``bench scale`` on the CPU: the same sweep over 1 and 2 slots of real Ray Tune trials, its figures, and
the leaderboard rows that must not change with the number of devices (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY_DT = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "noise_levels": [0.0, 0.5],
           "eval_workers": 1, "data_workers": 1, "compile": False}
SMALL = {"axis": "cpu", "cpus_per_trial": 1, "tasks": ["window-close"], "seeds": [0, 1],
         "methods": {"full": {"lr": 1.0e-3}, "lora": {"r": 4, "lr": 1.0e-3}}, "steps": 30, "eval_episodes": 1,
         "batch_size": 8, "pretrain_tasks": ["reach"], "pretrain_steps": 10, "data_episodes": 2, "settings": TINY_DT}


@pytest.mark.slow
def test_one_sweep_over_one_and_two_slots(tmp_path, monkeypatch):
    out = tmp_path / "scale.json"
    sets = [f"{k}={json.dumps(v)}" for k, v in {**SMALL, "counts": [1, 2], "workdir": str(tmp_path / "w")}.items()]
    proc = subprocess.run([sys.executable, "-m", "harness", "bench", "scale", *sum((["--set", s] for s in sets), []),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HARNESS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["bench"] == "scale" and doc["command"].startswith("python -m harness bench scale")
    result = doc["result"]
    one, two = result["runs"]
    assert result["trials_per_count"] == 4  # 1 task x 2 methods x 2 seeds
    for run, count in ((one, 1), (two, 2)):
        assert (run["count"], run["trials"], run["ok"], run["updates"]) == (count, 4, 4, 4 * SMALL["steps"])
        assert run["most_trials_at_once"] == count  # the trials really ran side by side on two slots
        assert run["updates_per_s"] == pytest.approx(run["updates"] / run["span_s"], rel=0.01)
        assert run["trials_per_hour"] == pytest.approx(4 / run["span_s"] * 3600, rel=0.01)
    assert one["scaling_efficiency"] == 1.0
    assert two["scaling_efficiency"] == pytest.approx(two["updates_per_s"] / 2 / one["updates_per_s"], abs=0.002)
    # same seeds and settings: the rows match in everything but wall time, whatever the slots
    assert one["rows_identical_to_first"] and two["rows_identical_to_first"], two["row_differences"]
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

    overrides = {**SMALL, "counts": [1, 2], "workdir": str(tmp_path / "w")}
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    again = bench_scale(overrides)
    assert [r["updates_per_s"] for r in again["runs"]] == [one["updates_per_s"], two["updates_per_s"]]
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


def test_board_differences_ignore_wall_time_only(tmp_path):
    from agents.bench_scale import board_differences

    rows = pd.DataFrame({"method": ["full", "lora"], "task": ["t", "t"], "success_mean": [0.5, 0.25],
                         "wall_time_s": [10.0, 12.0], "ms_per_update": [3.0, 4.0], "date": ["d1", "d1"]})
    rows.to_csv(tmp_path / "a.csv", index=False)
    rows.assign(wall_time_s=[99.0, 1.0], ms_per_update=[9.0, 9.0], date=["d2", "d2"]).iloc[::-1].to_csv(
        tmp_path / "b.csv", index=False)
    assert board_differences(tmp_path / "a.csv", tmp_path / "b.csv") == []
    rows.assign(success_mean=[0.5, 0.3]).to_csv(tmp_path / "c.csv", index=False)
    assert board_differences(tmp_path / "a.csv", tmp_path / "c.csv") == ["lora t: success_mean 0.25 vs 0.3"]


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

"""End to end through Ray Tune: a tiny RL sweep writes the leaderboard, a NaN trial fails alone, and an
interrupted sweep resumes without rerunning or duplicating finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.tune_trial import PAUSE_TRIAL, PAUSED_MARKER

ROOT = Path(__file__).resolve().parents[1]

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "data_episodes": 2,
        "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 20, "pretrain_batch_size": 16,
        "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False,
        "warmup": 0, "grad_clip": 0.0, "eval_pretrained": False}


def sweep_file(tmp_path: Path, methods: dict, seeds=(0,), max_concurrent=None, steps: int = 8,
               report_every: int = 4) -> Path:
    doc = {"name": "tiny", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"], "methods": methods,
           "seeds": list(seeds),
           "budget": {"steps": steps, "eval_episodes": 1, "batch_size": 8, "report_every": report_every},
           "settings": TINY, "leaderboard": "tiny-cw10",
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": max_concurrent}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture()
def env(tmp_path):
    e = dict(os.environ)
    e["HARNESS_CACHE"] = str(tmp_path / "cache")
    e["RAY_DEDUP_LOGS"] = "0"
    e.pop("RAY_ADDRESS", None)
    return e


def records(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "tiny" / "tiny-records.jsonl").read_text().splitlines()]


def test_tiny_sweep_writes_leaderboard_and_survives_a_nan_trial(tiny_rl_sweep):
    """The shared tiny sweep (tests/conftest.py): ``full`` at lr 1e-4 and 1e30, ``lora``, and a plugin method
    that tests/test_extension.py asserts on; here the NaN trial, the board and Ray's view of the failure."""
    sweep, out = tiny_rl_sweep, tiny_rl_sweep.output
    assert sweep.returncode == 1, out[-4000:]  # some trials failed: the exit status says so
    recs = sweep.records()
    assert len(recs) == 4
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 1 and "NonFiniteLossError" in failed[0]["error"], [r.get("error") for r in recs]
    assert failed[0]["method"] == "full" and json.loads(failed[0]["settings"])["lr"] == 1e30
    table = pd.read_csv(sweep.board / "tiny-cw10.csv")
    assert sorted(table["method"]) == sorted(["full", "lora", sweep.plugin_method])
    row = table.set_index("method").loc["lora"]
    assert row["task"] == "window-close" and 0.0 <= row["success_mean"] <= 1.0
    assert row["trainable_params"] > 0 and row["data_source"] == "real" and row["n_seeds"] == 1
    assert row["ms_per_update"] > 0 and row["train_peak_memory_mb"] == 0.0  # the method's costs (no GPU here)
    # the chosen settings are the resolved ones: defaults filled in, so equal trials name the same row
    assert json.loads(table.set_index("method").loc["full", "settings"]) == {"lr": 1e-4, "weight_decay": None}
    ok = [r for r in recs if r["status"] == "ok"]
    assert all(json.loads(r["software"])["torch"] and r["device_name"] and r["git_commit"] for r in ok)
    board = sweep.board
    assert (board / "tiny-cw10-summary.csv").exists() and (board / "tiny-cw10.md").exists()
    assert "failed window-close full" in out
    assert "errored" in out  # Ray's own status agrees: the failed trial is ERROR, not TERMINATED
    # a trial's own failure is deterministic: Ray does not retry it (once per failed attempt it says so)
    assert out.count(" errored after ") == 1, out[-4000:]


def test_interrupted_sweep_resumes_without_rerunning(tmp_path, env):
    """The README's recovery path as a user meets it: the default (relative) --results and --leaderboard
    in the working folder, Ctrl-C (SIGINT) ends with 130, and the same command with --resume finishes."""
    # the second trial waits after its first update (a test hook), so Ctrl-C arrives with the first trial
    # finished, the second mid-way and the third not started, however fast or slow this machine is
    sweep_file(tmp_path, {"full": {"lr": [1.0e-4, 2.0e-4, 3.0e-4]}}, max_concurrent=1)
    res, board = tmp_path / "results", tmp_path / "leaderboard"
    args = ["sweep", "tiny.yaml", "--no-dashboard"]
    proc = run_cli(args, {**env, PAUSE_TRIAL: "_lr0.0002_"}, cwd=tmp_path)
    exp = res / "tiny" / "tiny-final"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(exp.glob(f"*/{PAUSED_MARKER}")):
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    (paused,) = exp.glob(f"*/{PAUSED_MARKER}")
    assert "_lr0.0002_" in paused.parent.name
    finished = [p.parent.name for p in exp.glob("*/result.json") if '"record"' in p.read_text()]
    assert len(finished) == 1 and "_lr0.0001_" in finished[0], finished  # the grid's first point, before it
    os.kill(proc.pid, signal.SIGINT)  # the driver alone, as `kill -INT`; Ctrl-C reaches its Ray workers too
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in out, out[-3000:]
    assert "Traceback" not in out.split("Stop signal received")[-1], out[-3000:]
    done_before = {p.parent.name for p in exp.glob("*/result.json") if '"record"' in p.read_text()}
    assert done_before == set(finished), out[-3000:]  # the paused trial did not finish on the way out
    assert not (res / "tiny" / "tiny-records.jsonl").exists()  # no record of an unfinished sweep

    proc = run_cli([*args, "--resume"], env, cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    recs = records(res)
    assert len(recs) == 3 and len({r["settings"] for r in recs}) == 3
    for name in done_before:  # finished trials were not run again: one final record each
        lines = (exp / name / "result.json").read_text().splitlines()
        assert sum('"record"' in line for line in lines) == 1
    assert len(pd.read_csv(board / "tiny-cw10.csv")) == 1

"""End to end through Ray Tune: a tiny RL sweep writes the leaderboard, a NaN trial fails alone, and an
interrupted sweep resumes without rerunning or duplicating finished trials. The sweeps themselves are run
once each by the shared fixtures of tests/conftest.py (``tiny_rl_sweep``, ``interrupted_rl_sweep``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "data_episodes": 2,
        "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 20, "pretrain_batch_size": 16,
        "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False,
        "warmup": 0, "grad_clip": 0.0, "eval_pretrained": False}


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


def test_interrupted_sweep_resumes_without_rerunning(interrupted_rl_sweep):
    """The README's recovery path as a user meets it (tests/conftest.py runs it): the default (relative)
    --results and --leaderboard in the working folder, Ctrl-C (SIGINT) ends with 130, and the same command
    with --resume finishes: the trial finished before Ctrl-C is not run again, the others run to the end."""
    sweep = interrupted_rl_sweep
    out = sweep.first.stdout
    assert sweep.first.returncode == 130 and "--resume" in out, out[-3000:]
    assert "Traceback" not in out.split("Stop signal received")[-1], out[-3000:]
    # the lr 1e-4 trial finished; the two paused ones did not finish on the way out
    assert len(sweep.finished_before) == 1 and "_lr0.0001_" in sweep.finished_before[0], out[-3000:]
    assert sweep.done_before == sweep.finished_before, out[-3000:]
    assert not sweep.records_after_interrupt  # no record of an unfinished sweep

    assert sweep.resumed.returncode == 0, sweep.resumed.stdout[-4000:]
    recs = sweep.records()
    assert len(recs) == 3 and len({r["settings"] for r in recs}) == 3
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    for name in sweep.done_before:  # finished trials were not run again: one final record each
        lines = (sweep.experiment / name / "result.json").read_text().splitlines()
        assert sum('"record"' in line for line in lines) == 1
    assert len(pd.read_csv(sweep.folder / "leaderboard" / "tiny-cw10.csv")) == 1

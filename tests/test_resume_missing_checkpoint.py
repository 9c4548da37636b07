"""``--resume`` when a checkpoint folder is gone (results moved without them, storage that lost them): the
trial whose checkpoint is missing starts again from update 0 with a warning naming it, the trial whose
checkpoint is there continues from it, and the sweep finishes green."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import yaml

from harness.tune_trial import KILL_AFTER_CHECKPOINT, MISSING_MARKER
from tests.test_sweep_e2e import TINY, run_cli

STEPS, EVERY = 8, 4


def test_resume_restarts_a_trial_whose_checkpoint_is_gone(tmp_path):
    doc = {"name": "gone", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"full": {"lr": [1.0e-3, 2.0e-3]}}, "seeds": [0],
           "budget": {"steps": STEPS, "eval_episodes": 1, "batch_size": 8, "report_every": 4},
           "settings": TINY, "leaderboard": "gone",
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "checkpoint_every": EVERY}}
    (tmp_path / "gone.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache"), "RAY_DEDUP_LOGS": "0",
           KILL_AFTER_CHECKPOINT: "pause"}  # both trials wait after their first checkpoint
    env.pop("RAY_ADDRESS", None)
    args = ["sweep", "gone.yaml", "--no-dashboard", "--cpus", "2"]
    proc = run_cli(args, env, cwd=tmp_path)
    exp = tmp_path / "results" / "gone" / "gone-final"
    deadline, ckpts = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None and len(ckpts) < 2:
        ckpts = sorted(exp.glob("*/checkpoint_*"))
        time.sleep(0.5)
    assert len(ckpts) == 2, "the trials did not both checkpoint"
    os.kill(proc.pid, signal.SIGINT)  # Tune saves the experiment's state, naming the checkpoints, as it stops
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    gone, kept = ckpts  # one trial's checkpoint lost, the other's still there
    shutil.rmtree(gone)

    env.pop(KILL_AFTER_CHECKPOINT)
    proc = run_cli([*args, "--resume"], env, cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-5000:]
    rel = f"{gone.parent.name}/{gone.name}"
    warnings = [line for line in out.splitlines() if "warning" in line and rel in line]
    assert len(warnings) == 1 and "starts again from update 0" in warnings[0], out[-3000:]
    assert "Could not recover from checkpoint" not in out
    recs = [json.loads(x) for x in (tmp_path / "results" / "gone" / "gone-records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    extras = sorted((json.loads(r["extra"]) for r in recs), key=lambda e: "checkpoint_missing" in e)
    resumed, restarted = extras
    assert resumed["resumed_from_update"] == EVERY and "checkpoint_missing" not in resumed
    assert restarted["checkpoint_missing"] == gone.name and "resumed_from_update" not in restarted
    assert restarted["updates"] == resumed["updates"] == STEPS
    # the marker folder went with the finished trial's checkpoints: only adapters remain
    assert not list(exp.rglob(MISSING_MARKER)) and not list(exp.rglob("checkpoint_*"))
    assert kept.parent.is_dir()

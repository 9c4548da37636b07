"""``--resume`` when a checkpoint folder is gone (results moved without them, storage that lost them): the
trial whose checkpoint is missing starts again from update 0 with a warning naming it, the trial whose
checkpoint is there continues from it, and the sweep finishes green."""

from __future__ import annotations

import json

from harness.tune_trial import MISSING_MARKER


def test_resume_restarts_a_trial_whose_checkpoint_is_gone(interrupted_rl_sweep):
    """tests/conftest.py: two trials paused after their first checkpoint when Ctrl-C arrived; one of the two
    checkpoints was removed before --resume."""
    sweep = interrupted_rl_sweep
    assert sweep.first.returncode == 130, sweep.first.stdout[-3000:]
    out = sweep.resumed.stdout
    assert sweep.resumed.returncode == 0, out[-5000:]
    gone, kept = sweep.gone, sweep.kept
    rel = f"{gone.parent.name}/{gone.name}"
    warnings = [line for line in out.splitlines() if "warning" in line and rel in line]
    assert len(warnings) == 1 and "starts again from update 0" in warnings[0], out[-3000:]
    assert "Could not recover from checkpoint" not in out
    recs = sweep.records()
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    extras = {r["settings"]: json.loads(r["extra"]) for r in recs}
    by_lr = {json.loads(settings)["lr"]: extra for settings, extra in extras.items()}
    resumed, restarted = by_lr[2.0e-4], by_lr[3.0e-4]  # kept: lr 2e-4's checkpoint; gone: lr 3e-4's
    assert "_lr0.0002_" in kept.parent.name and "_lr0.0003_" in gone.parent.name
    assert resumed["resumed_from_update"] == sweep.checkpoint_every and "checkpoint_missing" not in resumed
    assert restarted["checkpoint_missing"] == gone.name and "resumed_from_update" not in restarted
    assert restarted["updates"] == resumed["updates"] == sweep.steps
    # the trial finished before Ctrl-C was neither resumed nor restarted
    assert "resumed_from_update" not in by_lr[1.0e-4] and "checkpoint_missing" not in by_lr[1.0e-4]
    # the marker folder went with the finished trial's checkpoints: only adapters remain
    assert not list(sweep.experiment.rglob(MISSING_MARKER)) and not list(sweep.experiment.rglob("checkpoint_*"))
    assert kept.parent.is_dir()

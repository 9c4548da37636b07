"""Trials that survive preemption: a trial whose process dies after its first Tune checkpoint is retried by
Ray, continues from that checkpoint, and ends with the record of an uninterrupted run (times apart). The
uninterrupted trials run in one process (Tune's actor reuse), and are checked here too: each of their
records is the one the same trial gives alone. One sweep serves both: the three uninterrupted trials, then
a labelled copy of the AdaLoRA one (``adalora@killed``) whose process a test hook kills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.process_cache import REUSE_ENV
from harness.tune_trial import KILL_AFTER_CHECKPOINT
from tests.test_sweep_e2e import TINY

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 4
# dropout on, so the restored random streams matter; AdaLoRA, so its state outside the model does too
BUDGET = {"steps": STEPS, "eval_episodes": 1, "batch_size": 8, "report_every": 4}
SETTINGS = {**TINY, "dropout": 0.1, "deterministic": True}
METHODS = {"full": {"lr": 1.0e-3}, "lora": {"r": 2, "lr": 1.0e-3}, "adalora": {"r": 2, "lr": 1.0e-3}}


KILLED = "adalora@killed"  # the same trial as adalora's, under a variant label; its name: ..._adalora_killed_...


def run_sweep(tmp_path: Path, name: str, methods: dict, kill: str | None) -> list[dict]:
    doc = {"name": name, "track": "rl", "benchmark": "cw10", "tasks": ["window-close"], "methods": methods,
           "seeds": [0], "budget": BUDGET, "settings": SETTINGS, "leaderboard": name,
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "checkpoint_every": EVERY}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))  # the grid in the order written: the killed one last
    env = dict(os.environ, HARNESS_CACHE=str(tmp_path / "cache"), RAY_DEDUP_LOGS="0")
    for key in ("RAY_ADDRESS", KILL_AFTER_CHECKPOINT, REUSE_ENV):  # actors reused: the default
        env.pop(key, None)
    if kill:
        env[KILL_AFTER_CHECKPOINT] = kill
    done = subprocess.run([sys.executable, "-m", "harness", "sweep", str(path), "--results", str(tmp_path / name),
                           "--leaderboard", str(tmp_path / f"{name}-board"), "--no-dashboard", "--cpus", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    lines = (tmp_path / name / name / f"{name}-records.jsonl").read_text().splitlines()
    return sorted((json.loads(x) for x in lines), key=lambda r: r["method"])


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    """Three uninterrupted trials, checkpointing, one after another in one process (one 1-CPU slot, Tune's
    actor reuse), then the killed copy of the AdaLoRA one, last in the grid so that it cannot end the
    shared process early: the reference records, and the killed trial's record."""
    tmp = tmp_path_factory.mktemp("whole")
    records = run_sweep(tmp, "whole", {**METHODS, KILLED: METHODS["adalora"]}, kill="_adalora_killed_")
    killed = [r for r in records if r["method"] == KILLED]
    assert len(killed) == 1, records
    return tmp, [r for r in records if r["method"] != KILLED], killed[0]


@pytest.mark.slow
def test_a_killed_trial_continues_from_its_checkpoint_with_the_same_record(whole):
    base, uninterrupted, b = whole
    a = next(r for r in uninterrupted if r["method"] == "adalora")
    assert a["status"] == b["status"] == "ok"
    ea, eb = json.loads(a["extra"]), json.loads(b["extra"])
    # the retry continued from the first checkpoint, not from update 0, in a process of its own
    assert "resumed_from_update" not in ea and eb["resumed_from_update"] == EVERY
    assert eb["process_trials_before"] == 0 and eb["timing"]["process_started_at"] != ea["timing"]["process_started_at"]
    # the results are the same bit for bit; times and memory are measurements, not results
    for key in ("final_loss", "success", "success_any", "return", "trainable_params", "adapter_bytes"):
        assert a[key] == b[key], key
    assert ea["returns"] == eb["returns"] and ea["method"] == eb["method"]
    # a finished trial keeps no checkpoint: only its adapter
    assert not list((base / "whole").rglob("checkpoint_*"))
    assert Path(b["adapter_path"]).is_dir() and b["adapter_path"] != a["adapter_path"]


@pytest.mark.slow
def test_trials_in_one_process_give_the_records_of_trials_in_their_own(whole, monkeypatch):
    """Tune's actor reuse (issue 20, item 4; tests/test_trial_reuse.py has the parts): each record of the
    three trials that shared a process is the one the same trial gives with nothing run before it."""
    base, shared, _ = whole
    assert len(shared) == 3 and all(r["status"] == "ok" for r in shared)
    extras = [json.loads(r["extra"]) for r in shared]
    assert sorted(e["process_trials_before"] for e in extras) == [0, 1, 2]
    assert len({e["timing"]["process_started_at"] for e in extras}) == 1  # one process
    # each against the same trial without Ray (one thread, as in its 1-CPU slot) and with the base read
    # afresh; a trial under Tune gives run_trial's record (tests/test_cluster.py), so a difference is reuse's
    from harness import process_cache
    from harness.trial import MEASUREMENT_FIELDS, TrialSpec
    from harness.finetune import run_trial

    monkeypatch.setenv("HARNESS_CACHE", str(base / "cache"))
    monkeypatch.setattr(process_cache, "_states", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        apart = [run_trial(TrialSpec("rl", "cw10", "window-close", r["method"], json.loads(r["settings"]), 0, BUDGET,
                                     SETTINGS), lambda _: None).flat() for r in shared]
    finally:
        torch.set_num_threads(threads)
    skip = {*MEASUREMENT_FIELDS, "extra", "adapter_path", "selection", "grid_size"}  # the last two: the driver's
    for a, b, ea in zip(shared, apart, extras):
        assert b["status"] == "ok", b.get("error")
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}, \
            a["method"]
        assert ea["returns"] == json.loads(b["extra"])["returns"]

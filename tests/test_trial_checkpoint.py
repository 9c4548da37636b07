"""Trials that survive preemption: a trial whose process dies after its first Tune checkpoint is retried by
Ray, continues from that checkpoint, and ends with the record of an uninterrupted run (times apart)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from harness.tune_trial import KILL_AFTER_CHECKPOINT
from tests.test_sweep_e2e import TINY

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 4


def run_sweep(tmp_path: Path, name: str, kill: bool) -> list[dict]:
    # dropout on, so the restored random streams matter; AdaLoRA, so its state outside the model does too
    doc = {"name": name, "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"adalora": {"r": 2, "lr": 1.0e-3}}, "seeds": [0],
           "budget": {"steps": STEPS, "eval_episodes": 1, "batch_size": 8, "report_every": 4},
           "settings": {**TINY, "dropout": 0.1, "deterministic": True}, "leaderboard": name,
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "checkpoint_every": EVERY}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, HARNESS_CACHE=str(tmp_path / "cache"), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    env.pop(KILL_AFTER_CHECKPOINT, None)
    if kill:
        env[KILL_AFTER_CHECKPOINT] = "1"
    done = subprocess.run([sys.executable, "-m", "harness", "sweep", str(path), "--results", str(tmp_path / name),
                           "--leaderboard", str(tmp_path / f"{name}-board"), "--no-dashboard"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    lines = (tmp_path / name / name / f"{name}-records.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_a_killed_trial_continues_from_its_checkpoint_with_the_same_record(tmp_path):
    whole = run_sweep(tmp_path, "whole", kill=False)
    killed = run_sweep(tmp_path, "killed", kill=True)
    assert len(whole) == len(killed) == 1
    a, b = whole[0], killed[0]
    assert a["status"] == b["status"] == "ok"
    ea, eb = json.loads(a["extra"]), json.loads(b["extra"])
    # the retry continued from the first checkpoint, not from update 0
    assert "resumed_from_update" not in ea and eb["resumed_from_update"] == EVERY
    # the results are the same bit for bit; times and memory are measurements, not results
    for key in ("final_loss", "success", "success_any", "return", "trainable_params", "adapter_bytes"):
        assert a[key] == b[key], key
    assert ea["returns"] == eb["returns"] and ea["method"] == eb["method"]
    # a finished trial keeps no checkpoint: only its adapter
    assert not list((tmp_path / "killed").rglob("checkpoint_*"))
    assert Path(b["adapter_path"]).is_dir()

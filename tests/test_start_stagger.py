"""A wave's first trials on a shared GPU start apart (issue 20, item 4; ``harness.placement.start_delays``):
which trials wait and how long, the setting's validation, and a real sweep on a Ray cluster that declares a
GPU, where the second trial on it waits and its record says so, the wait kept out of the worker's start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.placement import AUTO_START_STAGGER_S, start_delays
from tests.test_cluster import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_the_first_trials_on_each_gpu_start_one_stagger_apart():
    keys = [f"t{i}" for i in range(12)]
    # four to a GPU on two GPUs: Ray fills the first GPU's shares, then the second's
    assert start_delays(keys, 0.25, 2, None, 5.0) == {"t1": 5.0, "t2": 10.0, "t3": 15.0,
                                                      "t5": 5.0, "t6": 10.0, "t7": 15.0}
    assert start_delays(keys, 0.5, 1, None, "auto") == {"t1": AUTO_START_STAGGER_S}
    assert start_delays(keys, 0.25, 1, 2, 3.0) == {"t1": 3.0}  # max_concurrent: two run at once
    assert start_delays(keys[:3], 0.25, 1, None, 3.0) == {"t1": 3.0, "t2": 6.0}  # a wave smaller than the GPU's shares
    # nothing to stagger: whole GPUs, CPU trials, no GPU in the cluster, or the setting at 0
    assert start_delays(keys, 1.0, 2, None, 5.0) == start_delays(keys, 0.0, 0, None, "auto") == {}
    assert start_delays(keys, 0.5, 0, None, 5.0) == start_delays(keys, 0.5, 1, None, 0) == {}


def test_a_negative_or_unknown_stagger_is_refused_naming_the_setting():
    from pydantic import ValidationError

    from harness.sweep_file import Resources

    assert Resources().start_stagger_s == 0 and Resources(start_stagger_s="auto").start_stagger_s == "auto"
    for bad in (-1, "soon"):
        with pytest.raises(ValidationError, match="start_stagger_s"):
            Resources(start_stagger_s=bad)


@pytest.mark.slow
def test_the_second_trial_on_a_shared_gpu_waits_and_its_record_says_so(tmp_path):
    """A local cluster whose head declares one GPU (none is needed: the trials run on the CPU, device cpu):
    two trials of a wave take half of it each (``gpus_per_trial: auto``), the second in the grid's order
    waits ``start_stagger_s`` before it begins."""
    from ray.cluster_utils import Cluster

    stagger = 3.0
    doc = {"name": "stagger", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"full": {"lr": [1.0e-4, 2.0e-4]}}, "seeds": [0],
           "budget": {"steps": 4, "eval_episodes": 1, "batch_size": 8}, "settings": TINY,
           "resources": {"cpus_per_trial": 1, "start_stagger_s": stagger}, "leaderboard": "stagger"}
    path = tmp_path / "stagger.yaml"
    path.write_text(yaml.safe_dump(doc))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.run([sys.executable, "-m", "harness", "sweep", str(path), "--address", cluster.address,
                               "--results", str(tmp_path / "results"), "--leaderboard", str(tmp_path / "board")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = (tmp_path / "results" / "stagger" / "stagger-records.jsonl").read_text().splitlines()
    records = {json.loads(r["settings"])["lr"]: json.loads(r["extra"]) for r in map(json.loads, lines)}
    assert set(records) == {1.0e-4, 2.0e-4}
    first, second = records[1.0e-4]["timing"], records[2.0e-4]["timing"]
    assert records[2.0e-4]["placement"]["ray"]["gpus"] == 0.5
    assert "start_delay_s" not in first and second["start_delay_s"] == stagger
    # the worker's start-up leaves the wait out: process start + start-up + wait = the trial's start
    began = records[2.0e-4]["started_at"] - second["process_started_at"]
    assert began == pytest.approx(second["process_to_trial_s"] + stagger, abs=0.01)

"""A real multi-node Ray cluster on this machine: a worker node dies mid-sweep, and the sweep still ends
with every trial recorded once (Ray retries trials whose node died), each killed trial continuing from
its last checkpoint with the record an uninterrupted run of it gives (issue 20, item 3). The same cluster
serves the shared-cache probe on every node (harness/shared_storage.py; its plain-data decisions are
tests/test_shared_storage.py's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "data_episodes": 2,
        "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 10, "pretrain_batch_size": 8,
        "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False,
        "eval_pretrained": False}


STEPS, EVERY = 600, 100  # updates per trial, and between two of its checkpoints


def _checkpointed_trials(experiment: Path) -> int:
    """How many of the experiment's trials have a checkpoint in the shared storage now."""
    return len({c.parent for c in experiment.glob("*/checkpoint_*")})


@pytest.mark.slow
def test_sweep_survives_a_worker_node_dying(tmp_path, monkeypatch):
    """Also the cache probe on the same cluster, from this test's own Ray driver (the sweep is another): on
    one node it writes nothing, on two every node reads the probe, which is removed after, and a node that
    cannot answer (the worker, once it is gone) is named, not passed over."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token to pass around
    import ray
    from ray.cluster_utils import Cluster

    from harness.errors import ConfigError
    from harness.shared_storage import PROBE_PREFIX, check_probe_results, check_shared_cache, probe_nodes

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    settings = {**TINY, "deterministic": True}  # so that a continued trial can match an uninterrupted one
    budget = {"steps": STEPS, "eval_episodes": 1, "batch_size": 8, "report_every": 10}
    probed = tmp_path / "probed-cache"  # the probe's own folder: the sweep's cache is checked by the sweep
    try:
        ray.init(address=cluster.address)
        check_shared_cache(probed)  # one node: nothing to compare, nothing written
        assert not probed.exists()
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2
        seen = probe_nodes(probed, nodes, timeout_s=30)
        assert seen == {f"node {n['NodeManagerAddress']} (id {n['NodeID'][:12]})": True for n in nodes}
        check_shared_cache(probed)
        assert not list(probed.glob(f"{PROBE_PREFIX}*"))  # the probe is removed
        # every node reaches the results folder (one disk here; a shared filesystem on a real cluster), so a
        # checkpoint written on the worker is there for the retry on another node
        doc = {"name": "nodes", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
               "methods": {"full": {"lr": [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]}}, "seeds": [0],
               "budget": budget, "settings": settings,
               "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "checkpoint_every": EVERY},
               "leaderboard": "nodes"}
        path = tmp_path / "nodes.yaml"
        path.write_text(yaml.safe_dump(doc))
        env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
        res = tmp_path / "results"
        proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(path), "--address", cluster.address,
                                 "--results", str(res), "--leaderboard", str(tmp_path / "board")],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.time() + 300
        # kill the worker while its trials train, once each of the three running trials (two of them on the
        # worker) has saved a checkpoint
        while time.time() < deadline and proc.poll() is None and _checkpointed_trials(res / "nodes" / "nodes-final") < 3:
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before the node could be killed"
        # its running trials die with it; their retries and the fourth trial then run in the head's slot, one
        # after another in the head's process (Tune's actor reuse), so no node is added for them
        cluster.remove_node(worker)
        # the cache probe of a node that cannot answer (here: gone), while the sweep goes on without it
        gone = [n for n in nodes if n["NodeID"] == worker.node_id]
        with pytest.raises(ConfigError, match=rf"could not be checked.*id {worker.node_id[:12]}"):
            check_probe_results(probe_nodes(probed, gone, timeout_s=10), probed)
        assert not list(probed.glob(f"{PROBE_PREFIX}*"))
        proc.wait(timeout=600)
        reader.join(30)
        out = "".join(lines)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "errored" in out  # the dead node's trials failed in Ray, and were run again
    assert proc.returncode == 0, out[-4000:]
    records = [json.loads(line) for line in (res / "nodes" / "nodes-records.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), records
    assert len({r["settings"] for r in records}) == 4  # every grid point once
    # the dead node's trials continued from their checkpoints on another node, not from update 0
    resumed = [r for r in records if json.loads(r["extra"]).get("resumed_from_update")]
    assert resumed, [json.loads(r["extra"]).get("resumed_from_update") for r in records]
    for r in resumed:
        at = json.loads(r["extra"])["resumed_from_update"]
        assert 0 < at < STEPS and at % EVERY == 0, at
    # the retries ran in the head's process after its own trial: a reused actor restores a checkpoint too
    assert all(json.loads(r["extra"])["process_trials_before"] >= 1 for r in resumed), \
        [json.loads(r["extra"])["process_trials_before"] for r in records]
    assert not list(res.rglob("checkpoint_*"))  # finished trials keep their adapters, no training state
    # one of them against the same trial run uninterrupted (no Ray, one thread as in its 1-CPU slot)
    import torch

    from harness.trial import MEASUREMENT_FIELDS, TrialSpec
    from harness.finetune import run_trial

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    got = resumed[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = run_trial(TrialSpec("rl", "cw10", got["task"], got["method"], json.loads(got["settings"]), got["seed"],
                                    budget, settings), lambda _: None).flat()
    finally:
        torch.set_num_threads(threads)
    assert whole["status"] == "ok", whole.get("error")
    skip = {*MEASUREMENT_FIELDS, "extra", "adapter_path", "selection", "grid_size"}  # the latter two: the driver's
    assert {k: v for k, v in got.items() if k not in skip} == {k: v for k, v in whole.items() if k not in skip}
    assert json.loads(got["extra"])["returns"] == json.loads(whole["extra"])["returns"]


# Ray reads RAY_AUTH_MODE once per process: the token cluster lives in a process of its own.
TOKEN_CLUSTER = """
import os, sys, time
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
open(sys.argv[1] + ".tmp", "w").write(c.address)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while not os.path.exists(sys.argv[2]):
    time.sleep(0.2)
c.shutdown()
"""


@pytest.mark.slow
def test_a_cluster_with_token_authentication_names_what_is_missing(tmp_path):
    address_file, stop_file = tmp_path / "address", tmp_path / "stop"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    cluster = subprocess.Popen([sys.executable, "-c", TOKEN_CLUSTER, str(address_file), str(stop_file)],
                               env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t" * 32})
    try:
        deadline = time.time() + 120
        while not address_file.exists() and time.time() < deadline and cluster.poll() is None:
            time.sleep(0.2)
        assert address_file.exists(), "the token cluster did not start"
        proc = subprocess.run([sys.executable, "-m", "harness", "sweep", "sweeps/quickstart.yaml", "--only", "rl",
                               "--address", address_file.read_text(), "--results", str(tmp_path / "r")],
                              # Ray tries a refused connection once a second, 20 times by default: 2 say the same
                              cwd=ROOT, env={**env, "HARNESS_CACHE": str(tmp_path / "cache"),
                                             "RAY_NUM_REDIS_GET_RETRIES": "2"},
                              capture_output=True, text=True, timeout=300)
    finally:
        stop_file.touch()
        cluster.wait(timeout=120)
    assert proc.returncode == 2
    assert "error: could not connect to the Ray cluster" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr
    assert "Traceback" not in proc.stderr
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())  # nothing was built before the connection failed

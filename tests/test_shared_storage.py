"""The check that every node of a Ray cluster sees the artifact cache at the same path: the decision on
plain data, and the probe on a real two-node cluster on this machine (whose nodes share its filesystem)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.shared_storage import PROBE_PREFIX, check_probe_results, check_shared_cache, probe_nodes

ROOT = Path("/shared/harness-cache")


def test_all_nodes_seeing_the_cache_pass():
    check_probe_results({"node 10.0.0.1 (id aaa)": True, "node 10.0.0.2 (id bbb)": True}, ROOT)


def test_a_node_that_does_not_see_the_cache_is_named_with_what_to_do():
    with pytest.raises(ConfigError) as e:
        check_probe_results({"node 10.0.0.1 (id aaa)": True, "node 10.0.0.2 (id bbb)": False,
                             "node 10.0.0.3 (id ccc)": "no answer within 60 s"}, ROOT)
    msg = str(e.value)
    assert "1 of the 3 Ray nodes does not see the cache folder '/shared/harness-cache'" in msg
    assert "node 10.0.0.2 (id bbb)" in msg and "10.0.0.1" not in msg
    assert "could not be checked" in msg and "node 10.0.0.3 (id ccc) (no answer within 60 s)" in msg
    assert "Make sure these nodes are up" in msg
    assert "Put HARNESS_CACHE on storage every node mounts, e.g. NFS, at the same path" in msg


@pytest.mark.slow
def test_the_probe_runs_on_every_node_of_a_real_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token to pass around
    import ray
    from ray.cluster_utils import Cluster

    cache = tmp_path / "cache"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        check_shared_cache(cache)  # one node: nothing to compare, nothing written
        assert not cache.exists()

        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2
        seen = probe_nodes(cache, nodes, timeout_s=30)
        assert seen == {f"node {n['NodeManagerAddress']} (id {n['NodeID'][:12]})": True for n in nodes}
        check_shared_cache(cache)
        assert not list(cache.glob(f"{PROBE_PREFIX}*"))  # the probe is removed

        # A node that cannot answer (here: gone) is named, not passed over.
        cluster.remove_node(worker)
        gone = [n for n in nodes if n["NodeID"] == worker.node_id]
        with pytest.raises(ConfigError, match=rf"could not be checked.*id {worker.node_id[:12]}"):
            check_probe_results(probe_nodes(cache, gone, timeout_s=10), cache)
        assert not list(cache.glob(f"{PROBE_PREFIX}*"))
    finally:
        ray.shutdown()
        cluster.shutdown()

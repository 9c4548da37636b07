"""The check that every node of a Ray cluster sees the artifact cache at the same path: the decision on
plain data here; the probe on a real two-node cluster in tests/test_cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.shared_storage import check_probe_results

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


# The probe on a real two-node cluster (this machine's nodes share its filesystem) runs on the cluster of
# tests/test_cluster.py::test_sweep_survives_a_worker_node_dying, which once started its own.

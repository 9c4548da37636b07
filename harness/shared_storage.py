"""Is the artifact cache shared by every node of the Ray cluster?

The driver prepares data and pretrains models into its cache folder, and every trial reads them from the
same path (``HARNESS_CACHE``). A worker node that does not see that folder would not fail: it would build
everything again into a private copy, hours of pretraining per node. ``check_shared_cache`` finds this
before any compute: it writes a probe file with a random token into the cache folder and asks one tiny
task pinned to each alive node whether it reads that token there.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Mapping

from harness.cache import atomic_write_text
from harness.errors import ConfigError

PROBE_TIMEOUT_S = 60.0  # a new node may first start a worker process; a probe itself reads one small file
PROBE_PREFIX = ".shared-probe-"


def check_probe_results(seen: Mapping[str, bool | str], root: Path) -> None:
    """Decide on the probe's answers: ``seen`` maps each node's label to True when it read the token in
    ``root``, False when it did not, or a string saying why its probe did not answer. Raises ConfigError
    naming every node that does not (or could not be shown to) see ``root``; returns None when all do."""
    blind = sorted(label for label, ok in seen.items() if ok is False)
    unknown = sorted(f"{label} ({ok})" for label, ok in seen.items() if isinstance(ok, str))
    if not blind and not unknown:
        return
    parts = []
    if blind:
        verb = "does" if len(blind) == 1 else "do"
        parts.append(f"{len(blind)} of the {len(seen)} Ray nodes {verb} not see the cache folder {str(root)!r} (it is "
                     f"missing there or is another folder of the same name): {', '.join(blind)}. Trials there "
                     "would rebuild every dataset and pretrained model in a private copy. Put HARNESS_CACHE on "
                     "storage every node mounts, e.g. NFS, at the same path (and set it to that path where the "
                     "sweep is started)")
    if unknown:
        parts.append(f"{len(unknown)} of the {len(seen)} Ray nodes could not be checked for the cache folder "
                     f"{str(root)!r}: {', '.join(unknown)}. Make sure these nodes are up and run Ray tasks, and "
                     "that HARNESS_CACHE is on storage every node mounts (e.g. NFS) at the same path, then start "
                     "the sweep again")
    raise ConfigError("; ".join(parts))


def _node_label(node: Mapping) -> str:
    return f"node {node.get('NodeManagerAddress', '?')} (id {str(node['NodeID'])[:12]})"


def check_shared_cache(root: Path, timeout_s: float | None = None) -> None:
    """On a Ray cluster of more than one alive node, check that every node reads the cache folder ``root``
    at the same path (see the module docstring); raise ConfigError naming the nodes that do not. On one node
    it returns at once, with no Ray task. Ray must be initialised."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    check_probe_results(probe_nodes(root, nodes, timeout_s), root)


def probe_nodes(root: Path, nodes: list[Mapping], timeout_s: float | None = None) -> dict[str, bool | str]:
    """Write a probe file with a random token into ``root``, run one task pinned to each of ``nodes``
    (entries of ``ray.nodes()``) that reads it, remove the probe, and return each node's answer by its
    label: True (read the token), False (did not), or why its probe did not answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    # A fresh name per check: a node's NFS client may cache a negative lookup of a name it asked for before.
    probe = root / f"{PROBE_PREFIX}{token}"

    # Defined here, so Ray ships it by value: a node's worker reads the file without importing the harness.
    def read_probe(path: str, expected: str) -> bool:
        try:
            with open(path) as f:
                return f.read() == expected
        except OSError:
            return False

    remote = ray.remote(read_probe)
    seen: dict[str, bool | str] = {}
    try:
        atomic_write_text(probe, token)
        refs = {
            _node_label(n): remote.options(
                num_cpus=0,  # never waits behind busy CPUs
                max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(str(probe), token)
            for n in nodes
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        ready_ids = set(ready)
        for label, ref in refs.items():
            if ref not in ready_ids:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or its node gone: nothing left to stop
                    pass
                seen[label] = f"no answer within {timeout_s:g} s"
                continue
            try:
                seen[label] = bool(ray.get(ref))
            except Exception as e:  # the node died, or its worker could not start
                first_line = (str(e).splitlines() or [""])[0]
                seen[label] = f"the probe failed: {type(e).__name__}: {first_line}"
    finally:
        probe.unlink(missing_ok=True)
    return seen

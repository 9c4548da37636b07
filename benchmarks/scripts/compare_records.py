"""Whether two or more sweeps' records hold the same results: ``python benchmarks/scripts/compare_records.py A.tgz B.tgz ...``.

Each argument is a ``*-records.tgz`` that ``benchmarks/scripts/device/runbook.sh`` writes (or a
``records.jsonl``). Records are matched by task, method, settings, seed and budget; the measurements (``harness.trial.MEASUREMENT_FIELDS``)
and the parts of ``extra`` that describe where and how fast a trial ran (timing, placement, process history,
start time) are left out, everything else (scores, returns, losses, parameter counts, settings, adapter size)
must be equal to the bit. Prints one line per file against the first and exits 1 on a difference."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness.trial import is_measurement  # noqa: E402

# extra's keys that say where, when and how fast a trial ran, not what it found
RUN_ONLY_EXTRA = {"timing", "placement", "started_at", "eval_wall_s", "eval_groups", "process_trials_before",
                  "graphs_compiled", "compiled_step", "total_wall_s", "train_wall_s", "train_steps_per_s",
                  "memory_left_by_earlier_trials_mb"}
RUN_ONLY_TOP = {"adapter_path"}


def load(path: str) -> dict[str, dict]:
    """The records of one tgz or jsonl, by task, method, settings, seed and budget, without their measurements."""
    if path.endswith(".jsonl"):
        lines = Path(path).read_text().splitlines()
    else:
        with tarfile.open(path) as tar:
            lines = [line for member in tar.getmembers() if member.name.endswith("records.jsonl")
                     for line in tar.extractfile(member).read().decode().splitlines()]
    out = {}
    for line in filter(None, lines):
        record = json.loads(line)
        extra = json.loads(record.get("extra") or "{}")
        kept = {k: v for k, v in record.items() if not is_measurement(k) and k not in RUN_ONLY_TOP | {"extra"}}
        kept["extra"] = {k: v for k, v in extra.items() if k not in RUN_ONLY_EXTRA}
        out[" ".join(str(record.get(k)) for k in ("task", "method", "settings", "seed", "budget"))] = kept
    return out


def main(paths: list[str]) -> int:
    first = load(paths[0])
    status = 0
    for path in paths[1:]:
        other = load(path)
        differing = sorted(name for name in first.keys() | other.keys() if first.get(name) != other.get(name))
        print(f"{path} vs {paths[0]}: {len(other)} records vs {len(first)}, {len(differing)} differ")
        for name in differing[:5]:
            a, b = first.get(name) or {}, other.get(name) or {}
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            print(f"  {name}: " + "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}"[:200] for k in keys))
        status |= bool(differing)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

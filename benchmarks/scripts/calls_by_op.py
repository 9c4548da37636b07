"""Which top-level aten calls one eager training step dispatches, per phase and per call name, for two or more
methods side by side (CPU; issue 21: where a slow method's extra dispatches come from, e.g. AdaLoRA's against
LoRA's). Usage, from the repository root:

    python benchmarks/scripts/calls_by_op.py lora,adalora [SETTING=JSON ...]

SETTING=JSON are ``bench methods`` settings (``grouped=false``). It runs ``harness.bench_methods`` with
``profile=true`` and keeps its profiled step's counts by name (``profile_phases(by_name=)``), so the step, the
phases and what counts as a top-level call are the bench's; only the rows whose counts differ between the
methods are printed.
"""
import functools
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness import bench_methods as bm  # noqa: E402

COUNTS: dict[str, dict[str, Counter]] = {}


def main(argv: list[str]) -> None:
    settings = {"methods": argv[0].split(","), "profile": True}
    for kv in argv[1:]:
        key, value = kv.split("=", 1)
        settings[key] = json.loads(value)
    profile = bm.profile_phases

    @functools.wraps(profile)
    def named(trainer, hooks, *args, **kwargs):
        return profile(trainer, hooks, *args, by_name=COUNTS.setdefault(hooks.method.name, {}), **kwargs)

    bm.profile_phases = named
    bm.bench_methods(settings)
    names = list(COUNTS)
    for phase in bm.PHASES:
        counts = [COUNTS[n].get(phase, Counter()) for n in names]
        print(f"== {phase}: " + " ".join(f"{n}={sum(c.values())}" for n, c in zip(names, counts)))
        calls = set().union(*counts)
        for call in sorted(calls, key=lambda c: (-max(cs[c] for cs in counts), c)):
            row = [cs[call] for cs in counts]
            if len(set(row)) > 1:
                print(f"  {call:40s}" + "".join(f"{v:7d}" for v in row))


if __name__ == "__main__":
    main(sys.argv[1:])

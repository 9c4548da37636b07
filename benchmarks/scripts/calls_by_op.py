"""Which top-level aten calls one eager training step dispatches, per phase and per call name, for two or more
methods side by side (CPU; issue 21: where a slow method's extra dispatches come from, e.g. AdaLoRA's against
LoRA's). Usage, from the repository root:

    python benchmarks/scripts/calls_by_op.py lora,adalora [SETTING=JSON ...]

SETTING=JSON are ``bench methods`` settings (``grouped=false``). It runs ``harness.bench_methods`` with its
profiled step replaced by one that keeps the names, so the step, the phases and what counts as a top-level call
are the bench's; only the rows whose counts differ between the methods are printed.
"""
import collections
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness import bench_methods as bm  # noqa: E402

COUNTS: dict[str, dict[str, collections.Counter]] = {}


def _named_phases(trainer, hooks, batch, steps, top=12):
    from torch.profiler import ProfilerActivity, profile, record_function

    def one(step, mark):
        with mark("forward"):
            loss = trainer.compute_loss(batch)
        with mark("extra_loss"):
            reg = hooks.extra_loss(trainer.model)
            loss = loss if reg is None else loss + reg
        with mark("backward"):
            loss.backward()
        with mark("optimizer"):
            trainer.optimizer.step()
        with mark("on_step"):
            hooks.on_step(trainer.model, step)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step_index = step + 1

    trainer.model.train()
    for _ in range(steps - 1):
        one(trainer.step_index, lambda _n: contextlib.nullcontext())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one(trainer.step_index, record_function)
    spans = {e.name: (e.time_range.start, e.time_range.end) for e in prof.events() if e.name in bm.PHASES}
    counts = {p: collections.Counter() for p in bm.PHASES}
    for e in prof.events():
        if e.name.startswith("aten::") and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")):
            phase = next((p for p, (s, t) in spans.items() if s <= e.time_range.start <= t), None)
            if phase is not None:
                counts[phase][e.name] += 1
    COUNTS[hooks.method.name] = counts
    return {"aten_calls": {p: sum(c.values()) for p, c in counts.items()}}


def main(argv: list[str]) -> None:
    settings = {"methods": argv[0].split(","), "profile": True}
    for kv in argv[1:]:
        key, value = kv.split("=", 1)
        settings[key] = json.loads(value)
    bm.profile_phases = _named_phases
    bm.bench_methods(settings)
    names = list(COUNTS)
    for phase in bm.PHASES:
        print(f"== {phase}: " + " ".join(f"{n}={sum(COUNTS[n][phase].values())}" for n in names))
        calls = set().union(*(COUNTS[n][phase] for n in names))
        for call in sorted(calls, key=lambda c: (-max(COUNTS[n][phase][c] for n in names), c)):
            row = [COUNTS[n][phase][call] for n in names]
            if len(set(row)) > 1:
                print(f"  {call:40s}" + "".join(f"{v:7d}" for v in row))


if __name__ == "__main__":
    main(sys.argv[1:])

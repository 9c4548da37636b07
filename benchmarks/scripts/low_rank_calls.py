"""How many aten calls (nested included) one adapted Linear's eager forward and backward dispatch under bf16
autocast on the CPU, with the plain sum and autocast's per-step casts (``eager_in_place`` off) and with the
in-place add and kept casts (on); issue 21. A 3-d input of token rows, as a ViT or the DT gives a Linear.
Usage, from the repository root:

    python benchmarks/scripts/low_rank_calls.py
"""
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness.bench_methods import top_level_aten_call  # noqa: E402
from harness.methods import low_rank  # noqa: E402


def calls(fn) -> tuple[int, int]:
    """(top-level, all) aten calls that ``fn()`` dispatches."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(map(top_level_aten_call, events)), len(events)


def main() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(256, 128), torch.randn(256)
    a, b = torch.randn(8, 128, requires_grad=True), torch.randn(256, 8, requires_grad=True)
    x = torch.randn(2, 3, 128, requires_grad=True)
    for in_place in (False, True):
        low_rank.EAGER_IN_PLACE = in_place
        out = {}

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out["y"] = low_rank.low_rank_linear(x, weight, bias, a, b)

        forward()  # the first forward makes the kept casts
        fwd = calls(forward)
        bwd = calls(out["y"].float().sum().backward)
        print(f"eager_in_place={str(in_place).lower()}: forward {fwd[0]} top-level / {fwd[1]} all, "
              f"backward {bwd[0]} / {bwd[1]}")
    low_rank.EAGER_IN_PLACE = True


if __name__ == "__main__":
    main()

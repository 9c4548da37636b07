"""Top-level aten ops dispatched per eager training step, per method, on the CPU (issue 21: an eager step of
a small-adapter method on a GPU is bound by the number of dispatches, one kernel or more each).

Counts what ``python -m harness bench methods --set profile=true`` counts (aten calls not made by another
aten call, per phase: forward, extra loss, backward, optimizer, on_step) for one or more source trees,
each in its own process, on ViT-Tiny/16 at 32x32 (12 blocks, the four block Linears adapted: 48 layers),
batch 2, eager, fp32. Usage, from the repository root:

    python benchmarks/scripts/eager_dispatch_count.py [LABEL=TREE ...]

with no argument the working tree alone; e.g. ``before=/tmp/before after=.`` compares a ``git archive``
export with the working tree. Wall times on a shared CPU are not reported: only the counts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = ["full", "lora", "dora", "vera", "randlora", "nola", "glora", "eigenlora", "adalora"]
LAYERS = 48

CHILD = r"""
import json, os, sys, torch
torch.set_num_threads(1)
import harness
# the tree under test, not an editable install of another checkout
assert os.path.dirname(os.path.dirname(os.path.abspath(harness.__file__))) == os.getcwd(), harness.__file__
from harness.bench_methods import bench_methods
out = bench_methods({"methods": %r, "profile": True, "steps": 1, "warmup": 2, "profile_steps": 2,
                     "backbone": "vit_tiny_patch16_224", "img_size": 32, "batch_size": 2})
print("@@" + json.dumps({k: v.get("phases", {}).get("aten_calls", v) for k, v in out["methods"].items()}))
"""


def count(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", CHILD % (METHODS,)], cwd=tree, env=env, capture_output=True,
                          text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("@@")]
    if not line:
        raise SystemExit(f"{tree}: {proc.stderr[-3000:]}")
    return json.loads(line[0][2:])


def main(argv: list[str]) -> None:
    trees = dict(a.split("=", 1) for a in argv) or {"tree": "."}
    results = {label: count(Path(t).resolve()) for label, t in trees.items()}
    labels = list(results)
    print(f"aten ops per eager training step (ViT-Tiny/16 32x32, batch 2, {LAYERS} adapted Linears, CPU fp32): "
          "forward+extra_loss / backward / optimizer+on_step / total.\nThe optimizer's count is the CPU's "
          "per-parameter AdamW loop; on CUDA the trainer's AdamW is fused (a few kernels per step), so the "
          "last column compares forward+backward only:\nper adapted layer, the method's forward+backward ops "
          "beyond full fine-tuning's whole forward+backward, divided by the 48 layers.")
    head = "method".ljust(10) + "".join(f"{l:>34}" for l in labels)
    if len(labels) == 2:
        head += f"{'fw+bw per layer over full, ' + labels[0] + ' -> ' + labels[1]:>50}"
    print(head)
    for m in METHODS:
        cells, totals = [], []
        for l in labels:
            c = results[l].get(m, {})
            if "forward" not in c:
                cells.append(f"{str(c)[:32]:>34}")
                totals.append(None)
                continue
            fw, bw = c["forward"] + c["extra_loss"], c["backward"]
            opt = c["optimizer"] + c["on_step"]
            totals.append(fw + bw)
            cells.append(f"{f'{fw} / {bw} / {opt} / {fw + bw + opt}':>34}")
        row = m.ljust(10) + "".join(cells)
        if len(labels) == 2 and None not in totals:
            full = [results[l]["full"]["forward"] + results[l]["full"]["backward"] for l in labels]
            per = [(t - f) / LAYERS for t, f in zip(totals, full)]
            row += f"{f'{per[0]:.1f} -> {per[1]:.1f}':>50}"
        print(row)
    print("raw:", json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])

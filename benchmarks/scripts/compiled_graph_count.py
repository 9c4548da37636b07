"""What inductor makes of each method's compiled training step, per source tree (issue 21: did the eager
rewrites between two commits change the compiled graphs?).

For every method and workload, in one child process per source tree, the script compiles the trainer's
loss the way a trial with ``compile: true`` does (forward and loss in one ``torch.compile`` graph, the
backward through AOTAutograd), under bf16 autocast on the CPU (as the GPU runs it; the harness itself
autocasts only on CUDA), runs three training steps and records:

- kernels: inductor's generated kernels (``torch._inductor.metrics.generated_kernel_count``), forward and
  backward together;
- matmuls: every mm/addmm/bmm/baddbmm/mv/addmv of the post-grad graphs (what inductor lowers to extern
  BLAS calls), with operand dtypes and shapes, and its multiply-adds; fp32 ones are reported apart (an
  H200 without TF32 runs fp32 GEMMs about 15x slower than bf16);
- casts and copies: dtype conversions and clones of the post-grad graphs, with their element counts;
- dynamo: graph breaks, graphs and recompiles (``torch._dynamo.utils.counters``).

Workloads: ``vit`` a ViT-Tiny/16 at 32x32 px, batch 4 (the four block Linears adapted, 48 layers) and
``dt`` the tests' tiny DT (2 layers, width 32, context 6) at batch 8 (every Linear of the blocks adapted).
Usage, from the repository root:

    python benchmarks/scripts/compiled_graph_count.py [LABEL=TREE ...] [--methods a,b,...] [--json FILE]

e.g. ``before=/tmp/wt-d077 after=.``. Wall times on the shared CPU are not reported: only the counts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = ["full", "lora", "dora", "vera", "nola", "randlora", "eigenlora"]
WORKLOADS = {
    "vit": {"model": "vit", "backbone": "vit_tiny_patch16_224", "img_size": 32, "batch_size": 4},
    "dt": {"model": "dt", "tiny": True, "batch_size": 8},
}

CHILD = r"""
import collections, json, os, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
import harness
# the tree under test, not an editable install of another checkout
assert os.path.dirname(os.path.dirname(os.path.abspath(harness.__file__))) == os.getcwd(), harness.__file__
import torch._inductor.config as inductor_config
from torch._inductor import metrics
from torch._dynamo.utils import counters
from harness.bench_methods import _Workload, _bank, _defaults
from harness.finetune import MethodHooks
from harness.methods import MethodContext, get_method
from harness.training import LoopConfig, Trainer

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv"}
graphs = []

def shape(a):
    v = a.meta.get("val") if hasattr(a, "meta") else None
    return (str(v.dtype).replace("torch.", ""), tuple(int(s) for s in v.shape)) if isinstance(v, torch.Tensor) else None

def record(graph):  # inductor hands the post-grad torch.fx.Graph
    rows = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        op = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        out = shape(n)
        if op in MATMULS:
            ins = [s for s in (shape(a) for a in n.args) if s is not None]
            # operands of the product: the last two (addmm/baddbmm/addmv carry the added term first)
            x, y = ins[-2], ins[-1]
            k = x[1][-1]
            macs = k
            for d in out[1]:
                macs *= d
            rows.append({"op": op, "dtypes": [x[0], y[0]], "shapes": [list(x[1]), list(y[1])], "macs": macs})
        elif op in ("convert_element_type", "_to_copy", "clone", "copy_", "copy") and out is not None:
            numel = 1
            for d in out[1]:
                numel *= d
            rows.append({"op": op, "dtypes": [out[0]], "shapes": [list(out[1])], "numel": numel})
    graphs.append(rows)

inductor_config.post_grad_custom_post_pass = record

def run(workload, name, bank, work):
    torch._dynamo.reset()
    metrics.reset()
    counters.clear()
    graphs.clear()
    method = get_method(name)
    settings = method.default_settings()
    batch = work.batch
    ctx = MethodContext(total_steps=3, device=work.device, adapter_bank=bank, init_batches=lambda: [batch] * 4,
                        forward_fn=work.forward_fn, layer_inputs_fn=work.layer_inputs_fn, validate=lambda m: 0.0)
    model = method.wrap(work.model(), work.site, settings, ctx).to(work.device)
    trainer = Trainer(model, work.loss, lambda: batch, LoopConfig(steps=3, lr=1e-4, report_every=0), work.device,
                      MethodHooks(method, ctx))

    def loss(b):  # the trial's compiled loss, under the autocast the GPU runs it with
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return work.loss(trainer.model, b)

    trainer.compute_loss = torch.compile(loss)
    while trainer.step():
        pass
    mm = [r for g in graphs for r in g if "macs" in r]
    casts = [r for g in graphs for r in g if "numel" in r]
    return {
        "kernels": metrics.generated_kernel_count,
        "graphs": len(graphs),
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(v for k, v in counters["recompiles"].items()) if "recompiles" in counters else 0,
        "matmuls": len(mm), "matmuls_fp32": sum(1 for r in mm if "float32" in r["dtypes"]),
        "macs_bf16": sum(r["macs"] for r in mm if "float32" not in r["dtypes"]),
        "macs_fp32": sum(r["macs"] for r in mm if "float32" in r["dtypes"]),
        "casts": len(casts), "cast_elements": sum(r["numel"] for r in casts),
        "per_graph": [[(r["op"], r["dtypes"], r["shapes"]) for r in g] for g in graphs],
    }

out = {}
for workload, cfg in json.loads(sys.argv[1]).items():
    full_cfg = {**_defaults(False, cfg["model"]), "compile": False, **cfg}
    work = _Workload(full_cfg, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        bank = _bank(work, Path(tmp))
        for name in json.loads(sys.argv[2]):
            try:
                out[f"{workload}/{name}"] = run(workload, name, bank, work)
            except Exception as e:
                out[f"{workload}/{name}"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[{workload}/{name}] done", file=sys.stderr, flush=True)
print("@@" + json.dumps(out))
"""


def count(tree: Path, methods: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(WORKLOADS), json.dumps(methods)], cwd=tree,
                          env=env, capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("@@")]
    if not line:
        raise SystemExit(f"{tree}: {proc.stderr[-3000:]}")
    return json.loads(line[0][2:])


SUMMARY = ("kernels", "graph_breaks", "recompiles", "matmuls", "matmuls_fp32", "macs_bf16", "macs_fp32", "casts",
           "cast_elements")


def main(argv: list[str]) -> None:
    methods, dump = METHODS, None
    trees = {}
    it = iter(argv)
    for a in it:
        if a == "--methods":
            methods = next(it).split(",")
        elif a == "--json":
            dump = next(it)
        else:
            label, path = a.split("=", 1)
            trees[label] = path
    trees = trees or {"tree": "."}
    results = {label: count(Path(t).resolve(), methods) for label, t in trees.items()}
    if dump:
        Path(dump).write_text(json.dumps(results, indent=1))
    labels = list(results)
    print("Compiled training step per method (inductor, CPU, bf16 autocast), " + " | ".join(labels) + ":")
    print("kernels, graph breaks, recompiles, matmuls (of which fp32), multiply-adds bf16 / fp32, casts+copies "
          "(elements)")
    for key in results[labels[0]]:
        cells = []
        for l in labels:
            r = results[l].get(key, {})
            if "error" in r or not r:
                cells.append(str(r.get("error", "missing"))[:60])
                continue
            cells.append(f"{r['kernels']} k, {r['graph_breaks']} gb, {r['recompiles']} rc, {r['matmuls']} mm "
                         f"({r['matmuls_fp32']} fp32), {r['macs_bf16']:,} / {r['macs_fp32']:,} MAC, "
                         f"{r['casts']} casts ({r['cast_elements']:,})")
        print(f"{key:<16}" + "  |  ".join(cells))
        graphs = [results[l].get(key, {}).get("per_graph") for l in labels]
        if len(labels) == 2 and all(graphs) and graphs[0] != graphs[1]:
            for i, (g0, g1) in enumerate(zip(graphs[0], graphs[1])):
                a = sorted(map(json.dumps, g0))
                b = sorted(map(json.dumps, g1))
                only0 = [x for x in a if x not in b or a.count(x) > b.count(x)]
                only1 = [x for x in b if x not in a or b.count(x) > a.count(x)]
                if only0 or only1:
                    print(f"    graph {i}: only in {labels[0]}: {sorted(set(only0))}")
                    print(f"    graph {i}: only in {labels[1]}: {sorted(set(only1))}")


if __name__ == "__main__":
    main(sys.argv[1:])

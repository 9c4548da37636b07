"""The vision track module (the interface is in harness/trial.py).

Benchmarks:
- ``vtab1k``: the 19 VTAB-1K tasks (NOAH's layout under ``data_root``; ``cifar100`` / ``oxford_pet``
  folder spellings accepted).
- ``fewshot``: ``<dataset>-<k>shot`` for Food101, Flowers102, Stanford Cars, Oxford Pets, FGVC Aircraft
  and k in 1, 2, 4, 8, 16; the shots are drawn with the trial's seed and recorded in the record's extra.
- ``domain_shift``: the one task ``imagenet`` (16 shots per class; metrics top1 = ImageNet val,
  top1_imagenet, top1_v2, top1_sketch, top1_a, top1_r).
- ``builtin``, ``builtin-fewshot``, ``builtin-shift``: the synthetic offline suite (vision/builtin.py),
  always labelled synthetic.

Stages (budget key ``stage``): "select" trains on train800 and reports val200 top-1 as ``top1``;
"final" trains on train800val200 and reports test top-1 as ``top1`` (plus the other test sets).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from harness.errors import ConfigError, DataError, choices_message
from harness.trial import TrialResult, TrialSpec
from vision import builtin, domain_shift, fewshot, vtab
from vision.backbones import DEFAULT_TARGETS, Backbone, build_backbone, check_model_name
from vision.images import TaskData

BENCHMARKS: dict[str, list[str]] = {
    "vtab1k": list(vtab.TASKS),
    "fewshot": list(fewshot.TASKS),
    "domain_shift": list(domain_shift.TASKS),
    "builtin": list(builtin.TASKS),
    "builtin-fewshot": list(builtin.FEWSHOT_TASKS),
    "builtin-shift": list(builtin.SHIFT_TASKS),
}
GROUPS: dict[str, dict[str, list[str]]] = {
    "vtab1k": vtab.GROUPS,
    "builtin": builtin.GROUPS,
    "builtin-shift": builtin.GROUPS,
    "fewshot": {},
    "builtin-fewshot": {},
    "domain_shift": {},
}
SYNTHETIC = ("builtin", "builtin-fewshot", "builtin-shift")

DEFAULTS: dict[str, Any] = {
    "backbone": "vit_base_patch16_224.augreg_in21k",  # any timm ViT name
    "weights": "auto",  # auto (builtin for the built-in suite, hf-cache otherwise) | builtin | random | hf-cache | FILE
    "data_root": "",  # folder holding the task folders (real benchmarks)
    "img_size": None,  # None: the backbone's own input size (224 for the papers' ViTs)
    "model_kwargs": {},  # extra timm.create_model kwargs, e.g. {patch_size: 8, depth: 4} for tiny CPU models
    "adapter_targets": list(DEFAULT_TARGETS),
    "drop_path": 0.1,  # NOAH/FacT VTAB configs
    "lr": 1e-3,  # track default learning rate (a method's setting or default_lr wins)
    "weight_decay": 1e-4,
    "device": "auto",
    "compile": False,  # torch.compile the training forward (GPU)
    "threads": 0,  # torch CPU threads per trial (0: leave torch's default)
    "save_adapter": True,
    "data_seed": 0,  # seed of the built-in suite's rendering
    "shift_shots": domain_shift.SHOTS,  # ImageNet shots per class for domain_shift
    "decode_workers": 8,
    # builtin backbone: formula-driven pretraining (vision/pretrain.py). These defaults are for a GPU and
    # ViT-B; the CPU quickstart uses a tiny ViT and pretrain_classes 16, pretrain_steps 600,
    # pretrain_batch_size 64, pretrain_lr 2e-3, pretrain_instances 100 (calibration notes in vision/pretrain.py)
    "pretrain_classes": 1000,
    "pretrain_steps": 20000,
    "pretrain_batch_size": 256,
    "pretrain_lr": 1e-3,
    "pretrain_weight_decay": 0.05,
    "pretrain_points": 3072,
    "pretrain_instances": 0,  # >0: a pool of this many pre-rendered instances per class (FractalDB: 1000); 0: new every step
    "pretrain_seed": 0,
}
BUDGET: dict[str, Any] = {
    "epochs": 100,  # VTAB-1K: 100 epochs
    "warmup_epochs": 10,
    "steps": None,  # caps the number of updates (tests, quick runs); the schedule is rescaled to it
    "batch_size": 64,
    "eval_batch_size": 256,
    "stage": "final",  # select: train800 -> val200; final: train800val200 -> test
}
PRIMARY_METRIC = "top1"
STAGES = ("select", "final")


def DATA_SOURCE(track_settings: dict[str, Any], benchmark: str | None = None) -> str:
    """"synthetic" for the built-in benchmarks, "real" for data read from ``data_root``."""
    if benchmark is not None:
        return "synthetic" if benchmark in SYNTHETIC else "real"
    return "real" if (track_settings or {}).get("data_root") else "synthetic"


def settings(track_settings: dict[str, Any]) -> dict[str, Any]:
    """Track settings merged over DEFAULTS; unknown keys fail naming the valid ones."""
    unknown = sorted(set(track_settings or {}) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown vision setting(s) {unknown}; valid: {', '.join(sorted(DEFAULTS))}")
    ts = {**DEFAULTS, **(track_settings or {})}
    check_model_name(ts["backbone"])
    mk = ts["model_kwargs"] or {}
    if not isinstance(mk, dict) or any(not isinstance(k, str) or v is None for k, v in mk.items()):
        raise ConfigError(f"vision setting model_kwargs={mk!r}: expected a mapping of timm.create_model "
                          "keyword arguments to values, e.g. {patch_size: 8, depth: 4}")
    targets = ts["adapter_targets"]
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"vision setting adapter_targets={targets!r}: expected a list of module names, "
                          f"e.g. {list(DEFAULT_TARGETS)}")
    return ts


def _weights(ts: dict[str, Any], benchmark: str) -> str:
    w = str(ts["weights"])
    if w == "auto":
        return "builtin" if benchmark in SYNTHETIC else "hf-cache"
    return w


def _data_root(ts: dict[str, Any], benchmark: str) -> Path:
    if not ts.get("data_root"):
        raise ConfigError(f"benchmark {benchmark!r} reads real data: set data_root (--data-root DIR); "
                          f"the offline benchmarks need none: {', '.join(SYNTHETIC)}")
    root = Path(ts["data_root"]).expanduser()
    if not root.is_dir():
        raise DataError(f"data_root {root} does not exist")
    return root


def load_data(ts: dict[str, Any], benchmark: str, task: str, size: int, seed: int) -> TaskData:
    """The task's splits as uint8 tensors at ``size`` (real data decoded straight to size, cached)."""
    if benchmark in SYNTHETIC:
        return builtin.load_task(benchmark, task, seed=seed, data_seed=int(ts["data_seed"]))
    root = _data_root(ts, benchmark)
    if benchmark == "vtab1k":
        return vtab.load_task(root, task, size)
    if benchmark == "fewshot":
        return fewshot.load_task(root, task, size, seed)
    if benchmark == "domain_shift":
        return domain_shift.load_task(root, size, seed, int(ts["shift_shots"]))
    raise ConfigError(choices_message("vision benchmark", benchmark, list(BENCHMARKS)))


def make_backbone(ts: dict[str, Any], benchmark: str, num_classes: int,
                  log: Callable[[dict], None] | None = None) -> Backbone:
    """The backbone with a fresh ``num_classes`` head and the configured weights."""
    weights = _weights(ts, benchmark)
    ckpt, key = None, ""
    if weights == "builtin":
        from vision.pretrain import ensure_pretrained

        ckpt, key, _ = ensure_pretrained(ts, log)
    return build_backbone(ts["backbone"], num_classes, weights, ts["img_size"], float(ts["drop_path"]),
                          ts["model_kwargs"], tuple(ts["adapter_targets"]), ckpt, key)


def pretrain(track_settings: dict[str, Any]) -> dict[str, Any]:
    """``python -m harness pretrain vision``: pretrain (or find cached) the builtin backbone."""
    from vision.pretrain import ensure_pretrained

    ts = settings(track_settings)
    path, key, summary = ensure_pretrained(ts)
    return {"checkpoint": str(path), "key": key[:12], **summary}


def make_data(track_settings: dict[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """``python -m harness data vision``: render and cache the built-in suite (all variants' base splits)."""
    ts = settings(track_settings)
    out = {}
    for task in tasks or BENCHMARKS["builtin"]:
        if task not in builtin.TASKS:
            raise ConfigError(choices_message("built-in task", task, list(builtin.TASKS)))
        data = builtin.load_task("builtin-shift", task, data_seed=int(ts["data_seed"]))
        out[task] = {k: len(v) for k, v in data.splits.items()}
    return out


def prepare(track_settings: dict[str, Any], benchmark: str, tasks: list[str], report: Callable[[dict], None]) -> None:
    """Before any trial: check settings and folders (bad data fails here), pretrain the builtin backbone
    if needed, decode and cache every task's images, and check the weights fit the architecture."""
    ts = settings(track_settings)
    if benchmark not in BENCHMARKS:
        raise ConfigError(choices_message("vision benchmark", benchmark, list(BENCHMARKS)))
    bad = [t for t in tasks if t not in BENCHMARKS[benchmark] and vtab.canonical(t) not in BENCHMARKS[benchmark]]
    if bad:
        raise ConfigError(choices_message(f"task of {benchmark}", bad[0], BENCHMARKS[benchmark]))
    # validate every folder first (cheap), so a bad task fails before any decoding or pretraining
    if benchmark not in SYNTHETIC:
        root = _data_root(ts, benchmark)
        for t in tasks:
            if benchmark == "vtab1k":
                vtab.validate(root, t)
            elif benchmark == "fewshot":
                fewshot.validate(root, t)
            else:
                domain_shift.validate(root)
    bb = make_backbone(ts, benchmark, 2, report)  # weights mismatch fails here, before training
    for t in tasks:
        started = time.time()
        data = load_data(ts, benchmark, t, bb.img_size, seed=0)
        report({"prepared": t, "splits": {k: len(v) for k, v in data.splits.items()},
                "seconds": round(time.time() - started, 2)})


def _bank(method, bb: Backbone, task: str) -> list[str]:
    if not method.needs_bank:
        return []
    from harness.adapters import find_bank

    return [str(p) for p in find_bank(bb.base_key, task)]


def run(spec: TrialSpec, report: Callable[[dict], None]) -> TrialResult:
    """One trial: build backbone and data, wrap with the method, train, score, save the adapter."""
    from harness.methods import MethodContext, get_method
    from harness.training import pick_device
    from vision.train import DeviceSplit, schedule, top1, train

    ts = settings(spec.track_settings)
    budget = {**BUDGET, **(spec.budget or {})}
    unknown = sorted(set(spec.budget or {}) - set(BUDGET))
    if unknown:
        raise ConfigError(f"unknown vision budget key(s) {unknown}; valid: {', '.join(sorted(BUDGET))}")
    if budget["stage"] not in STAGES:
        raise ConfigError(choices_message("stage", budget["stage"], list(STAGES)))
    if int(ts["threads"]) > 0:
        torch.set_num_threads(int(ts["threads"]))
    device = pick_device(ts["device"])
    method = get_method(spec.method)
    msettings = method.resolve_settings(spec.method_settings)
    torch.manual_seed(spec.seed)

    # backbone first (its input size decides the decode size), then the data
    probe = make_backbone(ts, spec.benchmark, 2, report)
    data = load_data(ts, spec.benchmark, spec.task, probe.img_size, spec.seed)
    torch.manual_seed(spec.seed)  # the head's init depends on the seed only
    bb = make_backbone(ts, spec.benchmark, data.num_classes, report)
    model = bb.model.to(device)

    select = budget["stage"] == "select"
    train_split = data.splits["train800" if select else "train800val200"]
    eval_names = ["val200"] if select else ["test"] + sorted(k for k in data.splits if k.startswith("test_"))
    tr = DeviceSplit.make(train_split, bb.img_size, bb.mean, bb.std, device)
    val = DeviceSplit.make(data.splits["val200"], bb.img_size, bb.mean, bb.std, device)
    total, warmup, bs = schedule(len(tr), budget)
    eval_bs = int(budget["eval_batch_size"])

    def init_batches():
        g = torch.Generator().manual_seed(spec.seed + 1)
        perm = torch.randperm(len(tr), generator=g)
        return [tr.batch(perm[i:i + bs]) for i in range(0, len(tr), bs)]

    ctx = MethodContext(total_steps=total, seed=spec.seed, init_batches=init_batches,
                        forward_fn=lambda m, b: m(b[0]), evaluate=lambda m: top1(m, val, eval_bs),
                        adapter_bank=_bank(method, bb, spec.task), device=device)
    model = method.wrap(model, bb.site, msettings, ctx).to(device)
    lr = msettings.get("lr") or method.default_lr or float(ts["lr"])
    wd = msettings.get("weight_decay")
    wd = float(ts["weight_decay"]) if wd is None else float(wd)
    fwd = torch.compile(model) if ts["compile"] and device.type == "cuda" else model

    result = train(fwd, tr, total, warmup, bs, lr, wd, spec.seed,
                   on_step=lambda s: method.on_step(model, s, ctx), extra_loss=lambda: method.extra_loss(model),
                   report=report, report_every=max(1, total // 20))
    model = method.finalize(model, bb.site, msettings, ctx)

    metrics: dict[str, float] = {}
    for name in eval_names:
        split = DeviceSplit.make(data.splits[name], bb.img_size, bb.mean, bb.std, device)
        acc = top1(model, split, eval_bs, data.class_subsets.get(name))
        if name in ("val200", "test"):
            metrics["top1"] = acc
            if spec.benchmark == "domain_shift":
                metrics["top1_imagenet"] = acc
        else:
            metrics["top1_" + name.removeprefix("test_")] = acc
    metrics["train_loss"] = result.final_loss
    report({"update": total, **{k: round(v, 3) for k, v in metrics.items()}})

    own, head = method.count(model, bb.site)
    adapter_path = ""
    if ts["save_adapter"]:
        from harness.adapters import save_trial_adapter

        adapter_path = str(save_trial_adapter(method, model, bb.site, msettings, spec, bb.base_key))
    extra: dict[str, Any] = {
        "stage": budget["stage"], "eval_split": eval_names[0], "updates": total, "batch_size": bs, "lr": lr,
        "weight_decay": wd, "train_images": len(tr), "train_s": round(result.wall_s, 2),
        "images_per_s": round(total * bs / max(result.wall_s, 1e-9), 1), "data_share": round(result.data_share, 4),
        "img_size": bb.img_size, "device": str(device), "method_facts": method.describe(model),
    }
    if "shot_paths" in data.info:
        extra["shots"] = data.info["shots"]
        extra["shot_paths"] = data.info["shot_paths"]
    if data.info.get("skipped_test_sets"):
        extra["skipped_test_sets"] = data.info["skipped_test_sets"]
    return TrialResult(metrics=metrics, trainable_params=own, head_params=head, backbone=bb.describe(),
                       data_source=DATA_SOURCE(ts, spec.benchmark), adapter_path=adapter_path,
                       extra=json.loads(json.dumps(extra, default=str)))


def bench(track_settings: dict[str, Any]) -> dict[str, Any]:
    """``python -m harness bench vision``: training images/s for full fine-tuning and LoRA, and the share
    of step time spent producing batches. GPU: ViT-B/16 at 224, batch 256 (bf16 autocast). CPU: a tiny
    ViT at 32 px, batch 32 (said so in the output: CPU numbers are not comparable)."""
    from harness.methods import MethodContext, get_method
    from harness.training import pick_device
    from vision.images import Split
    from vision.train import DeviceSplit, train

    given = dict(track_settings or {})
    steps = int(given.pop("bench_steps", 0) or 0)
    ts = settings(given)
    device = pick_device(ts["device"])
    gpu = device.type == "cuda"
    if not gpu and "backbone" not in given:
        ts.update(backbone="vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 4})
    bs = 256 if gpu else 32
    steps = steps or (30 if gpu else 8)
    n = bs * 4
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    out: dict[str, Any] = {"device": str(device), "batch_size": bs, "steps": steps,
                           "note": "" if gpu else "CPU: tiny ViT at 32 px, batch 32; not comparable to GPU figures"}
    for mname in ("full", "lora"):
        try:
            method = get_method(mname)
        except Exception as e:  # the PEFT methods may be unavailable
            out[mname] = {"error": f"{type(e).__name__}: {e}"}
            continue
        bb = build_backbone(ts["backbone"], 10, "random", ts["img_size"], 0.0, ts["model_kwargs"],
                            tuple(ts["adapter_targets"]))
        model = method.wrap(bb.model.to(device), bb.site, method.resolve_settings({}), MethodContext(device=device))
        model = model.to(device)
        data = DeviceSplit.make(split, bb.img_size, bb.mean, bb.std, device)
        fwd = torch.compile(model) if ts["compile"] and gpu else model
        train(fwd, data, 3, 0, bs, 1e-4, 0.0, 0)  # warm-up (allocator, kernels, compile)
        if gpu:
            torch.cuda.synchronize()
        r = train(fwd, data, steps, 0, bs, 1e-4, 0.0, 0)
        if gpu:
            torch.cuda.synchronize()
        out[mname] = {"backbone": ts["backbone"], "img_size": bb.img_size,
                      "images_per_s": round(steps * bs / r.wall_s, 1), "ms_per_step": round(1000 * r.wall_s / steps, 2),
                      "data_share": round(r.data_share, 4)}
        del model, fwd, data
    if "images_per_s" in out.get("full", {}) and "images_per_s" in out.get("lora", {}):
        out["lora_step_vs_full"] = round(out["lora"]["ms_per_step"] / out["full"]["ms_per_step"], 3)
    return out

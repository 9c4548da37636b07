"""The vision track: a timm ViT fine-tuned on VTAB-1K, few-shot, domain-shift or the built-in synthetic suite.

Benchmarks:
- ``vtab1k``: the 19 VTAB-1K tasks (NOAH's layout under ``data_root``; ``cifar100`` / ``oxford_pet``
  folder spellings accepted).
- ``fewshot``: ``<dataset>-<k>shot`` for Food101, Flowers102, Stanford Cars, Oxford Pets, FGVC Aircraft
  and k in 1, 2, 4, 8, 16; the shots are drawn with the trial's seed and recorded in the record's extra.
- ``domain_shift``: the one task ``imagenet`` (16 shots per class; metrics top1 = ImageNet val,
  top1_imagenet, top1_v2, top1_sketch, top1_a, top1_r).
- ``builtin``, ``builtin-fewshot``, ``builtin-shift``: the synthetic offline suite (vision/builtin.py),
  always labelled synthetic.
- ``custom``: a user's own folders in NOAH's layout under ``data_root``, each folder a task, its class
  count read from its labels (vision/custom.py); labelled ``custom``, never as a VTAB task.
Each is one entry of the loader registry in ``vision/benchmarks.py``.

Stages (budget key ``stage``): "select" trains on train800 and reports val200 top-1 as ``top1``;
"final" trains on train800val200 and reports test top-1 as ``top1`` (plus the other test sets).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import Field, field_validator

from harness.errors import ConfigError, DataError
from harness.methods import AdapterSite
from harness.randomness import TrialRandom
from harness.tracks import Benchmark, FineTuneSetup, PlannedWork, Report, Track, TrackBudget, TrackSettings
from harness import training
from harness.training import Schedule, pick_device
from harness.validation import Bool, Float, Int
from vision import builtin, domain_shift, vtab
from vision.bench import bench as run_bench
from vision.benchmarks import BENCHMARKS, get_benchmark
from vision.backbones import DEFAULT_TARGETS, FEEDFORWARD, HEAD, Backbone, build_backbone, check_model_name, create, model_img_size
from vision.images import TaskData
from vision.pretrain import ensure_pretrained
from vision.train import DeviceSplit, batches, classification_loss, schedule, top1


class VisionSettings(TrackSettings):
    backbone: str = "vit_base_patch16_224.augreg_in21k"  # any timm ViT name
    weights: str = "auto"  # auto (builtin for the built-in suite, hf-cache otherwise) | builtin | random | hf-cache | FILE
    data_root: str = ""  # folder holding the task folders (real benchmarks)
    img_size: Int | None = Field(None, ge=8)  # None: the backbone's own input size (224 for the papers' ViTs)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra timm.create_model kwargs
    adapter_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    # input statistics: the timm tag's own, ImageNet's (NOAH/GLoRA's VTAB-1K protocol) or 0.5 (inception)
    normalization: Literal["backbone", "imagenet", "inception"] = "backbone"
    drop_path: Float = Field(0.1, ge=0, lt=1)  # NOAH/FacT VTAB configs
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(1e-4, ge=0)
    threads: Int = Field(0, ge=0)  # torch CPU threads per trial (0: leave torch's default)
    save_adapter: Bool = True
    data_seed: Int = 0  # seed of the built-in suite's rendering
    shift_shots: Int = Field(domain_shift.SHOTS, ge=1)  # ImageNet shots per class for domain_shift
    decode_workers: Int = Field(8, ge=1)
    # builtin backbone: formula-driven pretraining (vision/pretrain.py). These defaults are for a GPU and
    # ViT-B; the CPU quickstart's settings are in sweeps/quickstart.yaml.
    pretrain_classes: Int = Field(1000, ge=2)
    pretrain_steps: Int = Field(20000, ge=1)
    pretrain_batch_size: Int = Field(256, ge=1)
    pretrain_lr: Float = Field(1e-3, gt=0)
    pretrain_weight_decay: Float = Field(0.05, ge=0)
    pretrain_points: Int = Field(3072, ge=1)
    pretrain_instances: Int = Field(0, ge=0)  # >0: a pool of this many pre-rendered instances per class; 0: new every step
    pretrain_seed: Int = 0
    # `python -m harness bench vision`
    bench_steps: Int = Field(0, ge=0)  # 0: 30 on a GPU, 8 on a CPU

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        check_model_name(v)
        return v

    @field_validator("model_kwargs")
    @classmethod
    def _kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        if any(x is None for x in v.values()):
            raise ValueError("expected a mapping of timm.create_model keyword arguments to values, "
                             "e.g. {patch_size: 8, depth: 4}")
        return v


class VisionBudget(TrackBudget):
    epochs: Int = Field(100, ge=1)  # VTAB-1K: 100 epochs
    warmup_epochs: Int = Field(10, ge=0)
    steps: Int | None = Field(None, ge=1)  # caps the number of updates; the schedule is rescaled to it
    batch_size: Int = Field(64, ge=1)
    eval_batch_size: Int = Field(256, ge=1)


def _weights(ts: VisionSettings, benchmark: str, synthetic: bool) -> str:
    if ts.weights == "auto":
        return "builtin" if synthetic else "hf-cache"
    return ts.weights


def _data_root(ts: VisionSettings, benchmark: str) -> Path:
    if not ts.data_root:
        raise ConfigError(f"benchmark {benchmark!r} reads real data: set data_root (--data-root DIR); "
                          "the offline benchmarks (builtin, builtin-fewshot, builtin-shift) need none")
    root = Path(ts.data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data_root {root} does not exist")
    return root


class VisionTrack(Track):
    name = "vision"
    Settings = VisionSettings
    Budget = VisionBudget
    @property
    def benchmarks(self) -> dict[str, Benchmark]:  # type: ignore[override]
        """The registered benchmarks (``vision/benchmarks.py``), a plugin's among them."""
        return {name: entry.benchmark for name, entry in BENCHMARKS.items()}

    def benchmark(self, name: str) -> Benchmark:
        return get_benchmark(name).benchmark

    def check_tasks(self, benchmark: str, tasks: list[str]) -> list[str]:
        """A benchmark's other spellings of its tasks (VTAB's ``cifar100``, ``oxford_pet``) are accepted."""
        entry = get_benchmark(benchmark)
        valid = entry.benchmark.tasks
        super().check_tasks(benchmark, [t if t in valid else entry.canonical(t) for t in tasks])
        return list(tasks)

    # --- data and backbones --------------------------------------------------------------------------
    def load_data(self, ts: VisionSettings, benchmark: str, task: str, size: int, seed: int) -> TaskData:
        """The task's splits as uint8 tensors at ``size`` (real data decoded straight to size, cached)."""
        entry = get_benchmark(benchmark)
        root = None if entry.benchmark.data_source == "synthetic" else _data_root(ts, benchmark)
        return entry.load(ts, root, task, size, seed)

    def make_backbone(self, ts: VisionSettings, benchmark: str, num_classes: int,
                      log: Callable[[dict], None] | None = None) -> Backbone:
        """The backbone with a fresh ``num_classes`` head and the configured weights."""
        weights = _weights(ts, benchmark, self.data_source(benchmark) == "synthetic")
        ckpt, key = None, ""
        if weights == "builtin":
            ckpt, key, _ = ensure_pretrained(ts, log)
        return build_backbone(ts.backbone, num_classes, weights, ts.img_size, ts.drop_path, ts.model_kwargs,
                              tuple(ts.adapter_targets), ckpt, key, normalization=ts.normalization)

    def count_model(self, settings: VisionSettings, classes: int):
        """The backbone with random weights and a ``classes``-wide head (nothing read or downloaded)."""
        model = create(settings.backbone, classes, settings.img_size, 0.0, settings.model_kwargs)
        return model, AdapterSite(tuple(settings.adapter_targets), HEAD, FEEDFORWARD)

    def shape_model(self, settings: VisionSettings, benchmark: str):
        try:
            with torch.device("meta"):
                model = create(settings.backbone, 2, settings.img_size, 0.0, settings.model_kwargs)
        except Exception:  # noqa: BLE001 - a model timm cannot build on the meta device is checked at wrap time
            return None
        return model, AdapterSite(tuple(settings.adapter_targets), HEAD, FEEDFORWARD)

    # --- stages --------------------------------------------------------------------------------------
    def pretrain(self, settings: VisionSettings) -> dict[str, Any]:
        """Pretrain (or find cached) the builtin backbone."""
        path, key, summary = ensure_pretrained(settings)
        return {"checkpoint": str(path), "key": key[:12], **summary}

    def make_data(self, settings: VisionSettings, tasks: list[str] | None = None) -> dict[str, Any]:
        """Render and cache the built-in suite (all variants' base splits)."""
        out = {}
        for task in tasks or builtin.TASKS:
            self.check_tasks("builtin", [task])
            data = builtin.load_task("builtin-shift", task, data_seed=settings.data_seed)
            out[task] = {k: len(v) for k, v in data.splits.items()}
        return out

    def check_inputs(self, settings: VisionSettings, benchmark: str, tasks: list[str]) -> None:
        """The tasks, the data root and each task's list files and images (real benchmarks), and a weights
        file named by path."""
        self.check_tasks(benchmark, tasks)
        entry = get_benchmark(benchmark)
        if entry.benchmark.data_source == "real":
            root = _data_root(settings, benchmark)
            for t in tasks:
                entry.validate(root, t)
        weights = _weights(settings, benchmark, self.data_source(benchmark) == "synthetic")
        if weights not in ("builtin", "random", "hf-cache") and not Path(weights).expanduser().is_file():
            raise ConfigError(f"settings.weights={weights!r}: no such file; give a .safetensors, .pth or .npz "
                              "weights file, or one of auto, builtin, random, hf-cache")

    def prepare(self, settings: VisionSettings, benchmark: str, tasks: list[str], report: Report) -> dict[str, Any]:
        """Check folders (bad data fails here), pretrain the builtin backbone if needed, decode and cache
        every task's images, and check the weights fit the architecture."""
        self.check_inputs(settings, benchmark, tasks)  # every folder first (cheap): a bad task fails before decoding
        bb = self.make_backbone(settings, benchmark, 2, report)  # a weights mismatch fails here
        prepared = {}
        for t in tasks:
            started = time.time()
            data = self.load_data(settings, benchmark, t, bb.img_size, seed=0)
            prepared[t] = {k: len(v) for k, v in data.splits.items()}
            report({"prepared": t, "splits": prepared[t], "seconds": round(time.time() - started, 2)})
        return {"backbone": bb.describe(), "tasks": prepared}

    def bench(self, settings: VisionSettings) -> dict[str, Any]:
        return run_bench(settings)

    def planned_work(self, spec) -> PlannedWork:
        """Updates follow the training split's size: known in advance for VTAB-1K (fixed splits), else only
        once the data is loaded (then a ``steps`` cap, when the budget sets one, is all that is known)."""
        budget = spec.budget
        images = vtab.TRAIN_IMAGES.get(budget.stage) if spec.benchmark == "vtab1k" else None
        if images is not None:
            updates = schedule(images, budget)[0]
        else:
            updates = int(budget.steps) if budget.steps else None
        return PlannedWork(updates, images=images, epochs=int(budget.epochs))

    # --- one trial -----------------------------------------------------------------------------------
    def setup(self, spec, settings: VisionSettings, budget: VisionBudget, rng: TrialRandom,
              report: Report) -> FineTuneSetup:
        """Backbone and data of the trial's stage: train800 -> val200 (select) or train800val200 -> test."""
        ts = settings
        if ts.threads > 0:
            torch.set_num_threads(ts.threads)
        device = pick_device(ts.device)
        with torch.random.fork_rng(devices=[]):  # the probe (for its input size) draws nothing of the trial's
            try:  # on the meta device: no weights made or read twice per trial just for a number

                with torch.device("meta"):
                    size = model_img_size(create(ts.backbone, 2, ts.img_size, 0.0, ts.model_kwargs))
            except Exception:  # noqa: BLE001 - a model timm cannot build on the meta device: built for real
                size = self.make_backbone(ts, spec.benchmark, 2, report).img_size
        data = self.load_data(ts, spec.benchmark, spec.task, size, spec.seed)
        bb = self.make_backbone(ts, spec.benchmark, data.num_classes, report)

        select = budget.stage == "select"
        tr = DeviceSplit.make(data.splits["train800" if select else "train800val200"], bb.img_size, bb.mean, bb.std,
                              device)
        val = DeviceSplit.make(data.splits["val200"], bb.img_size, bb.mean, bb.std, device)
        eval_names = ["val200"] if select else ["test"] + sorted(k for k in data.splits if k.startswith("test_"))
        total, warmup, bs, per_epoch = schedule(len(tr), budget)
        eval_bs = budget.eval_batch_size
        aliases = get_benchmark(spec.benchmark).test_aliases
        order = batches(len(tr), bs, rng.generator("batches"))
        # a compiled step pads an epoch's short batch (one shape, one graph); an eager one need not pay for it
        pad_to = bs if ts.compile and device.type in training.COMPILED_DEVICES else None

        def init_batches():
            perm = torch.randperm(len(tr), generator=rng.generator("init-batches"))
            return [tr.batch(perm[i:i + bs]) for i in range(0, len(tr), bs)]

        def evaluate(m: torch.nn.Module) -> tuple[dict[str, float], dict[str, Any]]:
            metrics: dict[str, float] = {}
            for name in eval_names:
                split = val if name == "val200" else DeviceSplit.make(data.splits[name], bb.img_size, bb.mean,
                                                                      bb.std, device)
                acc = top1(m, split, eval_bs, data.class_subsets.get(name))
                if name in ("val200", "test"):
                    metrics["top1"] = acc
                    metrics.update(dict.fromkeys(aliases, acc))
                else:
                    metrics["top1_" + name.removeprefix("test_")] = acc
            return metrics, {}

        facts: dict[str, Any] = {"stage": budget.stage, "eval_split": eval_names[0], "batch_size": bs,
                                 "train_images": len(tr), "img_size": bb.img_size}
        facts.update({k: data.info[k] for k in ("shots", "shot_paths", "skipped_test_sets", "classes")
                      if data.info.get(k)})
        return FineTuneSetup(
            model=bb.model.to(device), site=bb.site, device=device,
            schedule=Schedule(steps=total, lr=ts.lr, weight_decay=ts.weight_decay, warmup=warmup, min_lr_ratio=0.01,
                              report_every=max(1, total // 20), steps_per_epoch=per_epoch),
            next_batch=lambda: tr.batch(next(order), pad_to), loss=classification_loss, evaluate=evaluate,
            base_key=bb.base_key, backbone=bb.describe(), data_source=self.data_source(spec.benchmark),
            validate=lambda m: top1(m, val, eval_bs), init_batches=init_batches, forward=lambda m, b: m(b[0]),
            loss_metric="train_loss", compile=ts.compile, compile_mode=ts.compile_mode, time_data=True, save_adapter=ts.save_adapter, facts=facts)

"""MT40 pretraining: data for the pretraining tasks, one DT trained on windows mixing the tasks, cached.

The checkpoint is cached (kind ``rl-pretrain``) under a key made of the data settings, the model
config, the optimiser settings, the number of updates and the seed; ``base_key`` (a hash of that key)
names the frozen base model that adapters are trained on, so EigenLoRA only ever combines adapters of
the same base. An interrupted pretraining resumes from its last checkpoint (kept outside the final
entry until it is complete).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from harness.cache import ArtifactCache, settings_hash
from harness.errors import ConfigError
from harness.randomness import derive_seed, seeded
from harness.training import LoopConfig, pick_device, train
from agents.data import DataSettings, Episodes, WindowSampler, build_datasets, say
from agents.dt import DTConfig, DecisionTransformer, batch_loss
from agents.tasks import MT40, check_task

KIND = "rl-pretrain"
EVAL_KIND = "rl-eval"
WEIGHTS = "model.pt"


@dataclass(frozen=True)
class OptimPlan:
    """The optimiser schedule of the DT (pretraining, and the defaults of fine-tuning)."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 4000  # shortened to steps // 10 for short runs (see effective_warmup)
    min_lr: float = 1e-6
    grad_clip: float = 0.25
    batch_size: int = 128
    compile: bool = False
    report_every: int = 50

    def effective_warmup(self) -> int:
        """The papers warm up 4000 updates in runs of 100K-1M; a run of a few hundred (the quickstart)
        would never leave warm-up, so at most a tenth of the run is warm-up."""
        return min(self.warmup, self.steps // 10)


@dataclass(frozen=True)
class PretrainPlan:
    """Everything that defines a pretrained DT."""

    tasks: tuple[str, ...]
    data: DataSettings
    model: DTConfig
    train: OptimPlan
    seed: int = 0

    def key(self) -> dict[str, Any]:
        t = self.train
        return {"tasks": list(self.tasks), "data": self.data.key("*"), "model": self.model.to_dict(),
                "train": {"steps": t.steps, "lr": t.lr, "weight_decay": t.weight_decay, "warmup": t.warmup,
                          "min_lr": t.min_lr, "grad_clip": t.grad_clip, "batch_size": t.batch_size},
                "seed": self.seed}

    def base_key(self) -> str:
        return settings_hash(self.key())[:16]


@dataclass
class Pretrained:
    path: Path  # the weights file
    base_key: str
    info: dict[str, Any]


def load_model(path: Path, cfg: DTConfig, device: torch.device | str = "cpu") -> DecisionTransformer:
    model = DecisionTransformer(cfg)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def pretrain(plan: PretrainPlan, device: torch.device | None = None, data_workers: int | None = None,
             cache: ArtifactCache | None = None, log: Callable[[str], None] | None = None) -> Pretrained:
    """Build (or reuse) the pretrained DT of ``plan``."""
    cache = cache or ArtifactCache()
    log = log or say
    if not plan.tasks:
        raise ConfigError(f"pretraining needs at least one task; MT40 is: {', '.join(MT40)}")
    for t in plan.tasks:
        check_task(t)
    key = plan.key()
    name = f"dt-{len(plan.tasks)}tasks"
    found = cache.lookup(KIND, name, key)
    if found is not None:
        return Pretrained(found.file(WEIGHTS), plan.base_key(), json.loads(found.file("info.json").read_text()))
    device = device or pick_device("auto")
    paths = build_datasets(list(plan.tasks), plan.data, data_workers, cache, log)
    sampler = WindowSampler([Episodes.load(paths[t]) for t in plan.tasks], plan.model.context, seed=plan.seed,
                            device=device)
    with seeded(derive_seed(plan.seed, "init")):
        model = DecisionTransformer(plan.model).to(device)
    # Resumable: the partial checkpoint sits beside the cache entries, under the same key.
    partial = cache.root / KIND / ".partial" / f"{plan.base_key()}.pt"
    log(f"[rl-pretrain] {plan.model.describe()}, {model.num_params() / 1e6:.2f}M params, "
        f"{plan.train.steps} updates on {len(plan.tasks)} task(s), device {device}")
    every = max(1, plan.train.report_every)

    from harness.progress import progress

    bar = progress(plan.train.steps, "rl-pretrain", unit="update")

    def report(m: dict[str, Any]) -> None:
        bar.update_to(m["update"], loss=m["loss"])
        if m["update"] % (every * 10) == 0 or m["update"] == plan.train.steps:
            log(f"[rl-pretrain] update {m['update']}/{plan.train.steps} loss {m['loss']:.4f}")

    t = plan.train
    cfg = LoopConfig(steps=t.steps, lr=t.lr, weight_decay=t.weight_decay, warmup=t.effective_warmup(),
                     min_lr=t.min_lr, grad_clip=t.grad_clip, compile=t.compile, report_every=t.report_every,
                     checkpoint=partial, checkpoint_every=max(1000, t.steps // 20))
    with seeded(derive_seed(plan.seed, "dropout")), bar:
        stats = train(model, batch_loss, lambda: sampler.sample(t.batch_size), cfg, device, report=report)
    info = {"base_key": plan.base_key(), "final_loss": stats.final_loss, "steps_per_s": stats.steps_per_s,
            "wall_s": stats.wall_s, "resumed_from": stats.resumed_from, "params": model.num_params(),
            "losses": stats.losses, "tasks": list(plan.tasks), "model": plan.model.to_dict()}

    def build(folder: Path) -> None:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS)
        (folder / "info.json").write_text(json.dumps(info, indent=1))

    art = cache.get_or_build(KIND, name, key, build)
    partial.unlink(missing_ok=True)
    log(f"[rl-pretrain] done: loss {stats.final_loss:.4f}, {stats.steps_per_s:.1f} updates/s, {stats.wall_s:.0f}s")
    return Pretrained(art.file(WEIGHTS), plan.base_key(), info)


def cached_eval(cache: ArtifactCache, name: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A small JSON result (rollout scores) cached like any artifact, so it is computed once."""
    def build(folder: Path) -> None:
        (folder / "result.json").write_text(json.dumps(compute(), indent=1))

    return json.loads(cache.get_or_build(EVAL_KIND, name, key, build).file("result.json").read_text())


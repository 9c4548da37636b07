"""A compact nanoGPT-style training loop for the DT, shared by pretraining and fine-tuning trials.

AdamW (no decay on biases, norms, embeddings), linear warm-up then one cosine cycle to ``min_lr``,
gradient clipping, bf16 autocast on CUDA, optional ``torch.compile``, a finite-loss check every update,
periodic progress reports and resumable, atomically written checkpoints.

Warm-up: the papers use 4000 warm-up updates for runs of 100K-1M updates. A short run (the quickstart's
few hundred updates) would then never leave warm-up, so the warm-up is ``min(warmup, steps // 10)``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from harness.training import autocast, check_finite, make_adamw, set_lr, warmup_cosine
from agents.dt import batch_loss, batch_to_device


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 4000  # shortened to steps // 10 for short runs
    min_lr: float = 1e-6
    grad_clip: float = 0.25
    batch_size: int = 128
    compile: bool = False
    report_every: int = 50
    checkpoint_every: int = 0  # updates between checkpoints; 0: none

    def effective_warmup(self) -> int:
        return min(self.warmup, self.steps // 10)


@dataclass
class TrainStats:
    steps: int
    final_loss: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    steps_per_s: float = 0.0
    resumed_from: int = 0


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None) -> None:
    """Model, optimiser and step, written to a temporary file and renamed (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def train(model: nn.Module, sample: Callable[[int], dict[str, Any]], cfg: TrainConfig, device: torch.device,
          report: Callable[[dict[str, Any]], None] | None = None, checkpoint: Path | None = None,
          extra_loss: Callable[[nn.Module], torch.Tensor | None] | None = None,
          on_step: Callable[[nn.Module, int], None] | None = None) -> TrainStats:
    """Train ``model`` (already on ``device``) for ``cfg.steps`` updates on batches from ``sample(batch_size)``.

    With ``checkpoint`` set, an existing checkpoint there is resumed from, and one is written every
    ``cfg.checkpoint_every`` updates and at the end.
    """
    optimizer = make_adamw(model, cfg.lr, cfg.weight_decay)
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start = load_checkpoint(Path(checkpoint), model, optimizer)
    step_model = model
    if cfg.compile and device.type == "cuda":
        step_model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = cfg.effective_warmup()
    stats = TrainStats(steps=cfg.steps, final_loss=float("nan"), resumed_from=start)
    model.train()
    t0 = time.time()
    loss_value = float("nan")
    for step in range(start, cfg.steps):
        set_lr(optimizer, warmup_cosine(step, cfg.steps, warmup, cfg.lr, cfg.min_lr))
        batch = batch_to_device(sample(cfg.batch_size), device)
        with autocast(device):
            loss = batch_loss(step_model, batch)
            if extra_loss is not None:
                reg = extra_loss(model)
                if reg is not None:
                    loss = loss + reg
        loss_value = check_finite(loss, step)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if on_step is not None:
            on_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if cfg.report_every and (done % cfg.report_every == 0 or done == cfg.steps):
            stats.losses.append((done, loss_value))
            if report is not None:
                report({"update": done, "loss": loss_value})
        if checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(Path(checkpoint), model, optimizer, done)
    if checkpoint is not None and cfg.steps > start:
        save_checkpoint(Path(checkpoint), model, optimizer, cfg.steps)
    model.eval()
    stats.final_loss = loss_value
    stats.wall_s = time.time() - t0
    stats.steps_per_s = (cfg.steps - start) / stats.wall_s if stats.wall_s > 0 else 0.0
    return stats

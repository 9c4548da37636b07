"""``python -m harness bench rl``: DT training speed (updates/s, TFLOP/s) through the harness's training loop,
and rollout env-steps/s of the DT policy against the scripted policy on the same worker processes."""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.randomness import seeded
from harness.training import LoopConfig, pick_device, train
from agents.dt import DecisionTransformer, batch_loss, batch_to_device, flops_per_step
from agents.rollout import evaluate_dt, evaluate_scripted


def bench(ts) -> dict[str, Any]:
    """Speed figures for the DT of the track settings ``ts`` (an ``agents.track.RLSettings``)."""
    from agents.track import RLBudget, model_config, rollout_workers

    device = pick_device(ts.device)
    cfg = model_config(ts)
    batch = RLBudget().batch_size
    with seeded(0):
        model = DecisionTransformer(cfg).to(device)
    rng = np.random.default_rng(0)
    K = cfg.context

    def sample() -> dict[str, Any]:  # random windows: speed does not depend on the values
        return batch_to_device({
            "states": rng.standard_normal((batch, K, cfg.state_dim), dtype=np.float32),
            "actions": rng.uniform(-1, 1, (batch, K, cfg.act_dim)).astype(np.float32),
            "returns_to_go": rng.random((batch, K, 1), dtype=np.float32),
            "rewards": rng.random((batch, K, 1), dtype=np.float32),
            "timesteps": np.tile(np.arange(K), (batch, 1)), "attention_mask": np.ones((batch, K), bool)}, device)

    loop = LoopConfig(steps=max(3, ts.bench_steps // 5), lr=ts.lr, weight_decay=ts.weight_decay,
                      grad_clip=ts.grad_clip, compile=ts.compile, report_every=0)
    with seeded(0):
        train(model, batch_loss, sample, loop, device)  # compile and allocator warm-up, not timed
        loop.steps = ts.bench_steps
        stats = train(model, batch_loss, sample, loop, device)
    flops = flops_per_step(cfg, batch)
    out: dict[str, Any] = {
        "device": str(device), "model": cfg.describe(), "params": model.num_params(), "batch_size": batch,
        "train_steps_per_s": round(stats.steps_per_s, 2), "train_ms_per_step": round(1000 / stats.steps_per_s, 2),
        "tflops_per_s": round(flops * stats.steps_per_s / 1e12, 2),
        "compiled": bool(ts.compile and device.type == "cuda"),
    }
    envs = ts.bench_envs
    workers = rollout_workers(ts, envs)
    task = "window-close"
    dt = evaluate_dt(model, task, envs, 1000.0, workers, 0, device)
    scripted = evaluate_scripted(task, envs, workers, 0)
    out.update({"rollout_envs": envs, "rollout_workers": workers,
                "dt_env_steps_per_s": round(dt.env_steps_per_s, 1),
                "scripted_env_steps_per_s": round(scripted.env_steps_per_s, 1),
                "dt_over_scripted": round(dt.env_steps_per_s / scripted.env_steps_per_s, 3)})
    print(f"[bench rl] train {out['train_steps_per_s']} updates/s ({out['tflops_per_s']} TFLOP/s) on {device}; "
          f"rollout {out['dt_env_steps_per_s']} env-steps/s with the DT vs {out['scripted_env_steps_per_s']} "
          f"scripted, ratio {out['dt_over_scripted']}", flush=True)
    return out

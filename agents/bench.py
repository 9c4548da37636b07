"""``python -m harness bench rl``: the harness's DT update against a plain PyTorch loop of the same model, in
one process, and rollout env-steps/s of the DT policy against the scripted policy on the same workers.

The harness side is what a fine-tuning trial runs: the training loop of ``harness/training.py`` on
windows drawn by the track's sampler from episodes of the trial's shape. The plain side is the loop a
researcher would write by hand: one fixed batch already on the device, fused AdamW, bf16 autocast,
clipping, nothing else. Both run eager and compiled (``compile``); the ratios are the harness's overhead.

The compiled runs use the track setting ``compile_mode``, as trials do (``default``, ``reduce-overhead``:
the compiled forward and backward replayed as CUDA graphs, or ``max-autotune-no-cudagraphs``), so the
modes can be compared on the same DT update.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import torch

from harness.randomness import seeded
from harness.training import LoopConfig, Trainer, autocast, compiled_loss, pick_device, synchronize
from agents.data import Episodes, WindowSampler
from agents.dt import DTConfig, DecisionTransformer, batch_loss, flops_per_step
from agents.rollout import TrialRollouts, evaluate_dt, evaluate_scripted
from agents.tasks import EPISODE_LENGTH


def random_episodes(n: int, cfg: DTConfig, seed: int = 0) -> Episodes:
    """Episodes of the real shape with random values: speed does not depend on the values."""
    rng = np.random.default_rng(seed)
    T = EPISODE_LENGTH
    return Episodes(rng.standard_normal((n, T, cfg.state_dim), dtype=np.float32),
                    rng.uniform(-1, 1, (n, T, cfg.act_dim)).astype(np.float32),
                    rng.random((n, T), dtype=np.float32), np.zeros((n, T), bool), np.zeros((n, T), bool),
                    np.zeros(n, np.float32))


def finetune_trainer(cfg: DTConfig, ts, batch: int, steps: int, compiled: bool, device: torch.device,
                     fixed_batch: bool = False, mode: str = "default") -> Trainer:
    """A fine-tuning trial's update loop on the DT of ``cfg``: the engine's Trainer on windows sampled on
    the device from random episodes of the real shape (``steps`` updates); ``mode``: torch.compile's mode
    where ``compiled`` (CUDA only, as the Trainer compiles)."""
    with seeded(0):
        model = DecisionTransformer(cfg).to(device)
    sampler = WindowSampler(random_episodes(200, cfg), cfg.context, seed=0, device=device)
    loop = LoopConfig(steps=steps, lr=ts.lr, weight_decay=ts.weight_decay, warmup=steps // 4,
                      min_lr_ratio=ts.min_lr_ratio, grad_clip=ts.grad_clip, compile=compiled, compile_mode=mode,
                      report_every=0)
    fixed = sampler.sample(batch)
    trainer = Trainer(model, batch_loss, (lambda: fixed) if fixed_batch else (lambda: sampler.sample(batch)), loop,
                      device)
    return trainer


def _harness_rate(cfg: DTConfig, ts, batch: int, steps: int, compiled: bool, device: torch.device,
                  fixed_batch: bool = False) -> float:
    trainer = finetune_trainer(cfg, ts, batch, 2 * steps, compiled, device, fixed_batch, ts.compile_mode)
    with seeded(0):
        for _ in range(steps):  # compile and allocator warm-up, not timed
            trainer.step()
        synchronize(device)
        t0 = time.perf_counter()
        while trainer.step():
            pass
        trainer.finish()
    return steps / (time.perf_counter() - t0)


def _plain_rate(cfg: DTConfig, ts, batch: int, steps: int, compiled: bool, device: torch.device) -> float:
    with seeded(0):
        model = DecisionTransformer(cfg).to(device).train()
    b = WindowSampler(random_episodes(200, cfg), cfg.context, seed=0, device=device).sample(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=ts.lr, weight_decay=ts.weight_decay,
                            fused=device.type == "cuda" or None)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device):
            return batch_loss(model, batch)

    loss_fn = compiled_loss(loss_of, ts.compile_mode) if compiled else loss_of

    def step() -> None:
        loss_fn(b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with seeded(0):
        for _ in range(steps):
            step()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
    return steps / (time.perf_counter() - t0)


# Kernel (GPU) or operator (CPU) names to a class of work, first match wins; the rest is "other".
KERNEL_CLASSES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|matmul|::mm\b|::addmm|::bmm|cutlass|nvjet|cublas|xmma|sm90_|sm80_|splitk"),
    ("optimizer", r"adam|multi_tensor|foreach|clip_grad|_fused_"),
    ("norm", r"norm"),
    ("dropout / random", r"dropout|philox|rand|bernoulli"),
    ("copy / fill", r"copy|memcpy|memset|fill|cat\b|index|gather|scatter|to_copy"),
    ("fused pointwise / reduction (compiled)", r"^triton_|^Torch-Compiled|CompiledFunction"),
    ("pointwise (eager)", r"elementwise|vectorized|unrolled|::add|::mul|::gelu|::sub|::div|reduce|::sum|::mean"),
)


def classify_kernel(name: str) -> str:
    """The class of work of a kernel or operator name (:data:`KERNEL_CLASSES`)."""
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "other"


def profile_update(cfg: DTConfig, ts, batch: int, steps: int, compiled: bool, device: torch.device,
                   top: int = 15) -> dict[str, Any]:
    """Where one fine-tuning update's time goes: ``steps`` updates of :func:`finetune_trainer` (after as
    many untimed ones) under ``torch.profiler``. On a GPU the device's kernels are counted (their self
    time); on the CPU the operators' self CPU time. Returns the wall time per update, the busy time per
    update (kernels or operators) and its share of the wall (on a GPU, ``1 - busy_share`` is time the
    device waits: launches, Python, synchronisation), the share of busy time per class of work
    (:func:`classify_kernel`), and the ``top`` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    trainer = finetune_trainer(cfg, ts, batch, 2 * steps, compiled, device, mode=ts.compile_mode)
    with seeded(0):
        for _ in range(steps):
            trainer.step()
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            synchronize(device)
            wall = time.perf_counter() - t0
    rows = []
    for e in prof.key_averages():
        if on_gpu:
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        else:
            if not e.key.startswith("aten::"):  # the operators, not the Python-level ranges around them
                continue
            us = float(e.self_cpu_time_total)
        if us > 0:
            rows.append((e.key, us, int(e.count)))
    busy_us = sum(us for _, us, _ in rows)
    classes: dict[str, float] = {}
    for name, us, _ in rows:
        label = classify_kernel(name)
        classes[label] = classes.get(label, 0.0) + us
    rows.sort(key=lambda r: -r[1])
    per_step_ms = lambda us: round(us / 1000 / steps, 4)  # noqa: E731
    return {
        "compiled": compiled, "steps": steps, "counted": "CUDA kernels" if on_gpu else "CPU operators (aten)",
        "wall_ms_per_update": round(1000 * wall / steps, 3),
        "busy_ms_per_update": per_step_ms(busy_us),
        "busy_share": round(busy_us / 1e6 / wall, 4) if wall > 0 else 0.0,
        "classes": {k: round(v / busy_us, 4) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])}
        if busy_us else {},
        "top": [{"name": name[:120], "class": classify_kernel(name), "ms_per_update": per_step_ms(us),
                 "calls_per_update": round(n / steps, 2)} for name, us, n in rows[:top]],
    }


def bench(ts, cfg: DTConfig, batch: int, workers: int) -> dict[str, Any]:
    """Speed figures for the DT ``cfg`` of the track settings ``ts`` (an ``agents.track.RLSettings``):
    training updates of ``batch`` windows, rollouts on ``workers`` processes (the track passes its own
    model, budget and worker count, so this module needs nothing else from it)."""
    device = pick_device(ts.device)
    steps = ts.bench_steps
    modes = [False, True] if ts.compile and device.type == "cuda" else [False]
    out: dict[str, Any] = {"device": str(device), "model": cfg.describe(), "batch_size": batch, "steps": steps,
                           "params": DecisionTransformer(cfg).num_params(), "compile_mode": ts.compile_mode,
                           "train": {}}
    flops = flops_per_step(cfg, batch)
    for compiled in modes:
        name = "compiled" if compiled else "eager"
        # alternated three times, medians reported: the GPU's clocks drift between runs by more than
        # the difference being measured
        runs = [(_harness_rate(cfg, ts, batch, steps, compiled, device),
                 _harness_rate(cfg, ts, batch, steps, compiled, device, fixed_batch=True),
                 _plain_rate(cfg, ts, batch, steps, compiled, device)) for _ in range(3)]
        harness, fixed, plain = (float(np.median(x)) for x in zip(*runs))
        out["train"][name] = {"harness_updates_per_s": round(harness, 2), "plain_updates_per_s": round(plain, 2),
                              "harness_over_plain": round(harness / plain, 3),
                              # each alternation's own ratio: a host-bound step's rates move with the host
                              # from one round to the next, and the spread says how far the median can be trusted
                              "harness_over_plain_rounds": [round(h / p, 3) for h, _, p in runs],
                              # the loop alone, on the plain loop's one fixed batch: sampling's share
                              "harness_fixed_batch_updates_per_s": round(fixed, 2),
                              "harness_tflops_per_s": round(flops * harness / 1e12, 2)}
        rounds = out["train"][name]["harness_over_plain_rounds"]
        print(f"[bench rl] {name}: harness {harness:.1f} updates/s, plain loop {plain:.1f}, "
              f"ratio {harness / plain:.3f} (rounds {min(rounds)}-{max(rounds)})", flush=True)
    if ts.bench_profile:
        compiled = modes[-1]
        out["profile"] = profile_update(cfg, ts, batch, steps, compiled, device)
        p = out["profile"]
        print(f"[bench rl] profile ({'compiled' if compiled else 'eager'}): {p['wall_ms_per_update']} ms/update, "
              f"busy {p['busy_share']:.0%} ({p['counted']}); by class: "
              + ", ".join(f"{k} {v:.0%}" for k, v in p["classes"].items()), flush=True)
    envs = ts.bench_envs
    task = "window-close"
    with seeded(0):
        model = DecisionTransformer(cfg).to(device)
    dt = evaluate_dt(model, task, envs, 1000.0, workers, 0, device)
    scripted = evaluate_scripted(task, envs, workers, 0)
    # a trial's second evaluation on the pool it keeps (TrialRollouts: a scheduler's rung, then the final one)
    with TrialRollouts(task, envs, workers, 0) as kept_pool:
        kept_pool.evaluate(model, 1000.0, device)
        kept = kept_pool.evaluate(model, 1000.0, device)
    env_steps = envs * EPISODE_LENGTH

    def per_step_ms(seconds: float) -> float:
        return round(1000 * seconds / EPISODE_LENGTH, 3)

    def steady(r) -> float:  # env-steps/s once the workers run: start-up (spawn, simulators, captures) left out
        return env_steps / (r.wall_s - r.start_s) if r.wall_s > r.start_s else 0.0

    out["rollout"] = {"envs": envs, "workers": workers, "dt_env_steps_per_s": round(dt.env_steps_per_s, 1),
                      "dt_policy_share": round(dt.policy_s / dt.wall_s, 3),
                      "scripted_env_steps_per_s": round(scripted.env_steps_per_s, 1),
                      "dt_over_scripted": round(dt.env_steps_per_s / scripted.env_steps_per_s, 3),
                      # where the DT rollout's time goes, per episode step (both groups of workers), and the
                      # start-up both rollouts pay once per evaluation
                      "dt_start_s": round(dt.start_s, 3), "dt_capture_s": round(dt.capture_s, 3),
                      "scripted_start_s": round(scripted.start_s, 3),
                      "dt_policy_ms_per_step": per_step_ms(dt.policy_s), "dt_wait_ms_per_step": per_step_ms(dt.wait_s),
                      "dt_other_ms_per_step": per_step_ms(dt.wall_s - dt.start_s - dt.policy_s - dt.wait_s),
                      "scripted_ms_per_step": per_step_ms(scripted.wall_s - scripted.start_s),
                      "dt_over_scripted_steady": round(steady(dt) / steady(scripted), 3) if steady(scripted) else None,
                      "dt_kept_pool_start_s": round(kept.start_s, 3),
                      "dt_kept_pool_env_steps_per_s": round(kept.env_steps_per_s, 1)}
    r = out["rollout"]
    print(f"[bench rl] rollout {dt.env_steps_per_s:.0f} env-steps/s with the DT vs {scripted.env_steps_per_s:.0f} "
          f"scripted, ratio {r['dt_over_scripted']} ({r['dt_over_scripted_steady']} after start-up); start-up "
          f"{dt.start_s:.2f} s (captures {dt.capture_s:.2f} s) vs {scripted.start_s:.2f} s; per step: policy "
          f"{r['dt_policy_ms_per_step']} ms, waiting for simulators {r['dt_wait_ms_per_step']} ms, scripted "
          f"{r['scripted_ms_per_step']} ms; a trial's next evaluation on its kept workers: start-up "
          f"{kept.start_s:.2f} s, {kept.env_steps_per_s:.0f} env-steps/s", flush=True)
    return out

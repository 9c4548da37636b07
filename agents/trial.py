"""The RL track module the harness calls (interface: ``harness/trial.py``).

A trial fine-tunes the MT40-pretrained Decision Transformer on one CW10 task with one adapter method,
then rolls it out in the simulator.

Metrics (one value per trial; the leaderboard averages over seeds):
- ``success``: fraction of evaluation episodes with ``info["success"]`` at the LAST step, the papers'
  code's convention (L2M). **The leaderboard ranks by this** (``PRIMARY_METRIC``).
- ``success_any``: success at any step (Meta-World's own evaluation and Continual World's convention).
- ``return``: mean undiscounted episode return.
- ``pretrained_success`` / ``pretrained_success_any`` / ``pretrained_return``: the pretrained DT without
  fine-tuning, on the same evaluation episodes (same start states), so each trial shows what fine-tuning
  added. Cached per (base model, task, episodes, seed): computed once.
- ``final_loss``: the last training loss (MSE on actions).

Data: simulator rollouts of Meta-World's scripted policies with Gaussian action noise ("real" data, not
synthetic, recorded as such in ``extra``); the papers used SAC replay buffers instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from harness.cache import ArtifactCache
from harness.errors import ConfigError
from harness.trial import TrialResult, TrialSpec
from agents.data import DataSettings, Episodes, WindowSampler, build_datasets, load_dataset
from agents.dt import (SITE, DTConfig, DecisionTransformer, batch_loss, batch_to_device, flops_per_step, forward_batch,
                       layer_tokens)
from agents.pretrain import PretrainPlan, cached_eval, load_model, pretrain as build_pretrained
from agents.rollout import evaluate_dt, evaluate_scripted
from agents.tasks import CW10, MT40, MT50, check_task
from agents.train import TrainConfig, train

BENCHMARKS: dict[str, list[str]] = {"cw10": list(CW10), "mt40": list(MT40)}
GROUPS: dict[str, dict[str, list[str]]] = {}
PRIMARY_METRIC = "success"

# Paper scale (EVA appendix E / L2M). Every key can be set in a sweep file's track settings.
DEFAULTS: dict[str, Any] = {
    # Decision Transformer
    "n_layer": 4, "n_head": 8, "n_embd": 512, "context": 50, "dropout": 0.2,
    # data: scripted policy + Gaussian action noise, episodes per task split evenly over the levels
    "data_episodes": 200, "noise_levels": [0.0, 0.1, 0.3, 0.6, 1.0], "data_seed": 0, "data_workers": 0,
    # pretraining on MT40
    "pretrain_tasks": list(MT40), "pretrain_steps": 1_000_000, "pretrain_batch_size": 128,
    "pretrain_lr": 1e-4, "pretrain_seed": 0, "pretrain_eval_episodes": 10,
    # optimiser, shared by pretraining and fine-tuning
    "lr": 1e-4, "weight_decay": 0.01, "warmup": 4000, "min_lr": 1e-6, "grad_clip": 0.25,
    # evaluation and runtime
    "eval_workers": 0,  # rollout processes; 0: min(episodes, CPU cores)
    "eval_pretrained": True,  # also score the pretrained DT on each trial's evaluation episodes
    "device": "auto", "compile": True,
    # `python -m harness bench rl`
    "bench_steps": 50, "bench_envs": 10,
}

BUDGET: dict[str, Any] = {"steps": 100_000, "eval_episodes": 10, "batch_size": 128, "stage": "final",
                          "report_every": 50}

# The quickstart's settings live in sweeps/quickstart.yaml (calibrated on a 2-core CPU).

_LISTS = {"noise_levels", "pretrain_tasks"}


def DATA_SOURCE(track_settings: dict[str, Any]) -> str:
    return "real"  # simulator rollouts (scripted policy + noise); see the module docstring


# --- settings -------------------------------------------------------------------------------------------

def resolve_settings(track_settings: dict[str, Any] | None) -> dict[str, Any]:
    """DEFAULTS merged with ``track_settings``; unknown keys and wrongly typed values raise ConfigError."""
    given = dict(track_settings or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown rl setting(s) {unknown}; valid: {', '.join(sorted(DEFAULTS))}")
    out = {**DEFAULTS, **given}
    for k, v in given.items():
        d = DEFAULTS[k]
        if k in _LISTS:
            if isinstance(v, str):
                v = [x.strip() for x in v.split(",") if x.strip()]
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"rl setting {k!r}={v!r}: expected a list")
            out[k] = list(v)
        elif isinstance(d, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"rl setting {k!r}={v!r}: expected true or false")
        elif isinstance(d, int):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"rl setting {k!r}={v!r}: expected an integer")
        elif isinstance(d, float):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"rl setting {k!r}={v!r}: expected a number")
            out[k] = float(v)
        elif isinstance(d, str) and not isinstance(v, str):
            raise ConfigError(f"rl setting {k!r}={v!r}: expected a string")
    for t in out["pretrain_tasks"]:
        check_task(t, MT50)
    out["noise_levels"] = [float(x) for x in out["noise_levels"]]
    if out["device"] not in ("auto", "cpu", "cuda") and not str(out["device"]).startswith("cuda:"):
        raise ConfigError(f"rl setting 'device'={out['device']!r}; valid: auto, cpu, cuda, cuda:N")
    return out


def data_settings(ts: dict[str, Any]) -> DataSettings:
    return DataSettings(episodes=ts["data_episodes"], noise_levels=tuple(ts["noise_levels"]), seed=ts["data_seed"])


def model_config(ts: dict[str, Any]) -> DTConfig:
    return DTConfig(n_layer=ts["n_layer"], n_head=ts["n_head"], n_embd=ts["n_embd"], context=ts["context"],
                    dropout=ts["dropout"])


def pretrain_plan(ts: dict[str, Any]) -> PretrainPlan:
    cfg = TrainConfig(steps=ts["pretrain_steps"], lr=ts["pretrain_lr"], weight_decay=ts["weight_decay"],
                      warmup=ts["warmup"], min_lr=ts["min_lr"], grad_clip=ts["grad_clip"],
                      batch_size=ts["pretrain_batch_size"], compile=ts["compile"])
    return PretrainPlan(tasks=tuple(ts["pretrain_tasks"]), data=data_settings(ts), model=model_config(ts),
                        train=cfg, seed=ts["pretrain_seed"])


def _workers(ts: dict[str, Any], episodes: int) -> int:
    return ts["eval_workers"] or max(1, min(episodes, os.cpu_count() or 1))


def _device(ts: dict[str, Any]) -> torch.device:
    from harness.training import pick_device

    return pick_device(ts["device"])


def _log(report: Callable[[dict[str, Any]], None] | None) -> Callable[[str], None]:
    return lambda msg: print(msg, flush=True)


# --- stages ---------------------------------------------------------------------------------------------

def make_data(track_settings: dict[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """`python -m harness data rl`: datasets of ``tasks`` (default: the pretraining tasks and CW10)."""
    ts = resolve_settings(track_settings)
    tasks = list(tasks) if tasks else list(dict.fromkeys(ts["pretrain_tasks"] + CW10))
    for t in tasks:
        check_task(t)
    paths = build_datasets(tasks, data_settings(ts), ts["data_workers"] or None)
    out = {}
    for t, p in paths.items():
        out[t] = {"path": str(p), **Episodes.load(p).summary()}
    return out


def pretrain(track_settings: dict[str, Any]) -> dict[str, Any]:
    """`python -m harness pretrain rl`: the pretrained DT (cached), with its MT40 evaluation."""
    ts = resolve_settings(track_settings)
    pre = build_pretrained(pretrain_plan(ts), _device(ts), ts["data_workers"] or None)
    result = {"path": str(pre.path), "base_key": pre.base_key,
              **{k: pre.info[k] for k in ("final_loss", "steps_per_s", "wall_s", "params")}}
    if ts["pretrain_eval_episodes"] > 0:
        result["eval"] = pretraining_eval(ts)
    return result


def pretraining_eval(ts: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Pretrained vs untrained DT on every pretraining task (cached): does pretraining teach anything?"""
    plan = pretrain_plan(ts)
    episodes = ts["pretrain_eval_episodes"]
    per_task = {}
    for task in plan.tasks:
        per_task[task] = {
            "pretrained": task_eval(ts, task, episodes, seed, untrained=False),
            "untrained": task_eval(ts, task, episodes, seed, untrained=True),
        }
    mean = {f"{which}_{m}": float(np.mean([r[which][m] for r in per_task.values()]))
            for which in ("pretrained", "untrained") for m in ("success", "success_any", "return")}
    print(f"[rl-pretrain] MT40 eval over {len(per_task)} task(s), {episodes} episodes each: "
          + ", ".join(f"{k} {v:.3g}" for k, v in mean.items()), flush=True)
    return {"mean": mean, "tasks": per_task}


def task_eval(ts: dict[str, Any], task: str, episodes: int, seed: int, untrained: bool = False) -> dict[str, Any]:
    """Rollout scores of the pretrained (or, as a reference, a randomly initialised) DT on ``task``; cached."""
    check_task(task)
    plan = pretrain_plan(ts)
    pre = build_pretrained(plan, _device(ts), ts["data_workers"] or None)
    target = float(load_dataset(task, plan.data).returns.max())
    key = {"base_key": pre.base_key, "task": task, "episodes": episodes, "seed": seed, "untrained": untrained,
           "target": target}

    def compute() -> dict[str, Any]:
        device = _device(ts)
        if untrained:
            torch.manual_seed(plan.seed)
            model = DecisionTransformer(plan.model).to(device).eval()
        else:
            model = load_model(pre.path, plan.model, device)
        r = evaluate_dt(model, task, episodes, target, _workers(ts, episodes), seed, device)
        return {"success": r.success, "success_any": r.success_any, "return": r.return_mean, "wall_s": r.wall_s}

    return cached_eval(ArtifactCache(), f"{task}-{'untrained' if untrained else 'pretrained'}", key, compute)


def prepare(track_settings: dict[str, Any], benchmark: str, tasks: list[str],
            report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Before any trial: the datasets of the pretraining and target tasks, and the pretrained DT (cached)."""
    ts = resolve_settings(track_settings)
    if benchmark not in BENCHMARKS:
        from harness.errors import choices_message

        raise ConfigError(choices_message("rl benchmark", benchmark, list(BENCHMARKS)))
    for t in tasks:
        check_task(t, BENCHMARKS[benchmark])
    build_datasets(list(dict.fromkeys(list(ts["pretrain_tasks"]) + list(tasks))), data_settings(ts),
                   ts["data_workers"] or None)
    pre = build_pretrained(pretrain_plan(ts), _device(ts), ts["data_workers"] or None)
    out: dict[str, Any] = {"checkpoint": str(pre.path), "base_key": pre.base_key}
    if ts["pretrain_eval_episodes"] > 0:
        out["pretraining_eval"] = pretraining_eval(ts)["mean"]
    return out


# --- one trial ------------------------------------------------------------------------------------------

def run(spec: TrialSpec, report: Callable[[dict[str, Any]], None]) -> TrialResult:
    """Fine-tune the pretrained DT on ``spec.task`` with ``spec.method``, then roll it out."""
    from harness.adapters import find_bank, save_trial_adapter
    from harness.methods import MethodContext, get_method
    from harness.trial import resolve_budget

    ts = resolve_settings(spec.track_settings)
    budget = resolve_budget(BUDGET, spec.budget, "rl budget")
    if spec.benchmark not in BENCHMARKS:
        from harness.errors import choices_message

        raise ConfigError(choices_message("rl benchmark", spec.benchmark, list(BENCHMARKS)))
    check_task(spec.task, BENCHMARKS[spec.benchmark])
    steps, batch_size, episodes = int(budget["steps"]), int(budget["batch_size"]), int(budget["eval_episodes"])
    if steps < 0 or batch_size < 1 or episodes < 1:
        raise ConfigError(f"rl budget: steps must be >= 0, batch_size and eval_episodes >= 1; got {budget}")
    device = _device(ts)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    started = time.time()

    plan = pretrain_plan(ts)
    pre = build_pretrained(plan, device, ts["data_workers"] or None)
    model = load_model(pre.path, plan.model, device)
    data = load_dataset(spec.task, plan.data, ts["data_workers"] or None)
    target = float(data.returns.max())
    sampler = WindowSampler(data, plan.model.context, seed=spec.seed)
    init_sampler = WindowSampler(data, plan.model.context, seed=spec.seed + 1)

    method = get_method(spec.method)
    settings = method.resolve_settings(spec.method_settings)
    val_sampler = WindowSampler(data, plan.model.context, seed=spec.seed + 2)
    val_batches = [batch_to_device(val_sampler.sample(batch_size), device) for _ in range(4)]

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> float:
        # GLoRA's subnet search scores candidates by action MSE on fixed windows of the task's data
        # (rollouts for every candidate would cost thousands of episodes); higher is better.
        was_training = m.training
        m.eval()
        score = -float(np.mean([float(batch_loss(m, b)) for b in val_batches]))
        m.train(was_training)
        return score

    ctx = MethodContext(evaluate=evaluate,
        total_steps=max(1, steps), seed=spec.seed,
        init_batches=lambda: [batch_to_device(init_sampler.sample(batch_size), device) for _ in range(8)],
        forward_fn=forward_batch, layer_inputs_fn=layer_tokens,
        adapter_bank=[str(p) for p in find_bank(pre.base_key, spec.task)] if method.needs_bank else [],
        device=device)
    model = method.wrap(model, SITE, settings, ctx).to(device)
    lr = settings.get("lr") or method.default_lr or ts["lr"]
    wd = settings.get("weight_decay")
    wd = ts["weight_decay"] if wd is None else wd
    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=wd, warmup=ts["warmup"], min_lr=ts["min_lr"],
                      grad_clip=ts["grad_clip"], batch_size=batch_size, compile=ts["compile"],
                      report_every=int(budget["report_every"]))
    stats = None
    if steps > 0:
        stats = train(model, sampler.sample, cfg, device, report=report, extra_loss=method.extra_loss,
                      on_step=lambda m, s: method.on_step(m, s, ctx))
    model = method.finalize(model, SITE, settings, ctx)
    model.eval()
    own, head = method.count(model, SITE)

    result = evaluate_dt(model, spec.task, episodes, target, _workers(ts, episodes), spec.seed, device)
    metrics: dict[str, float] = {**result.metrics(),
                                 "final_loss": float(stats.final_loss) if stats else float("nan")}
    if stats is None:
        metrics.pop("final_loss")
    if ts["eval_pretrained"]:
        base = task_eval(ts, spec.task, episodes, spec.seed)
        metrics.update({"pretrained_success": base["success"], "pretrained_success_any": base["success_any"],
                        "pretrained_return": base["return"]})
    report({"update": steps, **{k: v for k, v in metrics.items()}})
    adapter_path = save_trial_adapter(method, model, SITE, settings, spec, pre.base_key)
    extra = {
        "data": "Meta-World v3 scripted policies + Gaussian action noise (simulator rollouts)",
        "data_episodes": ts["data_episodes"], "noise_levels": ts["noise_levels"],
        "pretrain_tasks": len(plan.tasks), "pretrain_steps": plan.train.steps, "base_key": pre.base_key,
        "target_return": target, "lr": lr, "weight_decay": wd, "warmup": cfg.effective_warmup(),
        "train_steps_per_s": round(stats.steps_per_s, 2) if stats else 0.0,
        "train_wall_s": round(stats.wall_s, 2) if stats else 0.0, "eval_wall_s": round(result.wall_s, 2),
        "returns": [round(r, 1) for r in result.returns], "device": str(device),
        "method": method.describe(model), "total_wall_s": round(time.time() - started, 2),
    }
    return TrialResult(metrics=metrics, trainable_params=own, head_params=head, backbone=plan.model.describe(),
                       data_source=DATA_SOURCE(ts), adapter_path=str(adapter_path), extra=extra)


# --- speed ----------------------------------------------------------------------------------------------

def bench(track_settings: dict[str, Any]) -> dict[str, Any]:
    """`python -m harness bench rl`: DT training speed (updates/s, TFLOP/s) and rollout env-steps/s,
    DT policy vs the scripted policy on the same worker processes."""
    ts = resolve_settings(track_settings)
    device = _device(ts)
    cfg = model_config(ts)
    batch = BUDGET["batch_size"]
    model = DecisionTransformer(cfg).to(device)
    rng = np.random.default_rng(0)
    K = cfg.context

    def sample(b: int) -> dict[str, np.ndarray]:  # random windows: speed does not depend on the values
        return {"states": rng.standard_normal((b, K, cfg.state_dim), dtype=np.float32),
                "actions": rng.uniform(-1, 1, (b, K, cfg.act_dim)).astype(np.float32),
                "returns_to_go": rng.random((b, K, 1), dtype=np.float32),
                "rewards": rng.random((b, K, 1), dtype=np.float32),
                "timesteps": np.tile(np.arange(K), (b, 1)), "attention_mask": np.ones((b, K), bool)}

    warm = TrainConfig(steps=max(3, ts["bench_steps"] // 5), batch_size=batch, compile=ts["compile"], report_every=0)
    train(model, sample, warm, device)  # compile and allocator warm-up, not timed
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats = train(model, sample, replace(warm, steps=ts["bench_steps"]), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = flops_per_step(cfg, batch)
    out: dict[str, Any] = {
        "device": str(device), "model": cfg.describe(), "params": model.num_params(), "batch_size": batch,
        "train_steps_per_s": round(stats.steps_per_s, 2), "train_ms_per_step": round(1000 / stats.steps_per_s, 2),
        "tflops_per_s": round(flops * stats.steps_per_s / 1e12, 2), "compiled": bool(ts["compile"] and device.type == "cuda"),
    }
    envs = ts["bench_envs"]
    workers = _workers(ts, envs)
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

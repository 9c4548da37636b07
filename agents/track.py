"""The RL track: the MT40-pretrained Decision Transformer fine-tuned on one CW10 task, scored in the simulator.

Metrics (one value per trial; the leaderboard averages over seeds):
- ``success``: fraction of evaluation episodes with ``info["success"]`` at the LAST step, the papers'
  code's convention (L2M). **The leaderboard ranks by this** (the benchmark's primary metric).
- ``success_any``: success at any step (Meta-World's own evaluation and Continual World's convention).
- ``return``: mean undiscounted episode return.
- ``pretrained_success`` / ``pretrained_success_any`` / ``pretrained_return``: the pretrained DT without
  fine-tuning, on the same evaluation episodes (same start states), so each trial shows what fine-tuning
  added. Cached per (base model, task, episodes, seed): computed once.
- ``final_loss``: the last training loss (MSE on actions).
- ``expert_success`` / ``expert_success_any``: the task's data ceiling: the noise-free expert that made the
  data (``agents.tasks.Expert``) on the same evaluation episodes (same start states); cached per (task,
  episodes, seed, expert). A score near it is capped by the data, not by what the method learned.

Data: simulator rollouts of Meta-World's scripted policies with Gaussian action noise ("real" data, not
synthetic); the papers used SAC replay buffers instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from harness.cache import ArtifactCache
from harness.errors import ConfigError
from harness.placement import RaySlice, ray_slice, usable_cpus
from harness.process_cache import base_state
from harness.randomness import TrialRandom, derive_seed, seeded
from harness.tracks import Benchmark, FineTuneSetup, PlannedWork, Report, Track, TrackBudget, TrackSettings
from harness.training import Schedule, autocast, pick_device
from harness.validation import Bool, CompileMode, Float, Int, mode_needs_compile
from agents.bench import bench as run_bench
from agents.data import (DataSettings, Episodes, WindowSampler, build_datasets, data_report as build_report,
                         expert_hold, format_report, load_dataset, write_report)
from agents.dt import SITE, DTConfig, DecisionTransformer, ResidualDtype, batch_loss, forward_batch, layer_tokens
from agents.pretrain import (EVAL_KIND, BaseFile, CurveEval, OptimPlan, PretrainPlan, Pretrained, cached_eval,
                             export_base, load_model, pretrain as build_pretrained, read_base)
from agents.return_targets import PAPERS_RULE, RECIPE_RULE, ReturnTarget, canonical_rule, return_target
from agents.rollout import TaskPools, TrialRollouts, evaluate_dt, evaluate_dt_tasks, evaluate_scripted
from agents.tasks import CW10, EPISODE_LENGTH, MT40, MT50, check_task

DATA_NOTE = "Meta-World v3 scripted policies + Gaussian action noise (simulator rollouts)"


# Named bases. "recipe" (the defaults below) is the pretraining measured by time to quality on one H200
# (BENCHMARKS.md, "The RL base"): the papers' model, trained 90K updates at a higher learning rate with a
# short warm-up on less, less noisy data, because the papers' 1M updates cost hours per base. "paper" is
# the papers' optimisation (EVA appendix E / L2M: 1M updates, lr 1e-4, 4000 warm-up updates, dropout 0.2)
# on the harness's data at the noise mix of the earlier bases. Keys given in a sweep file win over both.
PRESETS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "paper": {"dropout": 0.2, "data_episodes": 200, "noise_levels": [0.0, 0.1, 0.3, 0.6, 1.0],
              "pretrain_steps": 1_000_000, "pretrain_lr": 1e-4, "pretrain_warmup": None,
              "return_target": PAPERS_RULE},
}


class RLSettings(TrackSettings):
    """The paper DT (EVA appendix E / L2M) with the measured base recipe (``preset``: ``recipe``, or the
    papers' own pretraining with ``paper``). Every key can be set in a sweep file's ``settings``."""

    preset: Literal["recipe", "paper"] = "recipe"

    # Decision Transformer
    n_layer: Int = Field(4, ge=1)
    n_head: Int = Field(8, ge=1)
    n_embd: Int = Field(512, ge=1)
    context: Int = Field(50, ge=1)
    dropout: Float = Field(0.1, ge=0, lt=1)
    # the residual stream under bf16 autocast: float32 (as autocast leaves it) or bfloat16 (half the bytes in
    # every norm and residual add; agents.dt.DTConfig.residual_dtype, BENCHMARKS.md has what it saves)
    residual_dtype: ResidualDtype = "float32"
    # the layers adapters go on (EVA section 4.1: every Linear of the blocks); slices of the fused qkv
    # (qkv.q, qkv.k, qkv.v) are split out as their own Linears (harness/targets.py)
    adapter_targets: list[str] = Field(default_factory=lambda: list(SITE.targets), min_length=1)
    # data: scripted policy + Gaussian action noise, episodes per task split evenly over the levels
    data_episodes: Int = Field(100, ge=1)
    noise_levels: list[Float] = Field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5], min_length=1)
    data_seed: Int = 0
    data_workers: Int = Field(0, ge=0)  # 0: one per core this process may use (the trial's, under Ray)
    # the data's expert: "hold" (scripted policy + open gripper + hold after success, agents/tasks.py) or
    # "scripted" (metaworld's policies as shipped: the data before the hold rule)
    expert: Literal["hold", "scripted"] = "hold"
    # pretraining on MT40
    pretrain_tasks: list[str] = Field(default_factory=lambda: list(MT40), min_length=1)
    pretrain_steps: Int = Field(90_000, ge=0)
    pretrain_batch_size: Int = Field(128, ge=1)
    pretrain_lr: Float = Field(3e-4, gt=0)
    pretrain_seed: Int = 0
    pretrain_eval_episodes: Int = Field(10, ge=0)
    pretrain_warmup: Int | None = Field(1000, ge=0)  # None: the shared ``warmup``
    # torch.compile's mode for pretraining's updates, as ``compile_mode`` is for trials' (reduce-overhead: CUDA
    # graphs); not in the base's key. Its own setting, default mode, until a GPU run has checked pretraining
    # under graphs (benchmarks/scripts/device/pretrain_graphs.sh): the sweep files' trials run under graphs
    pretrain_compile_mode: CompileMode = "default"
    # update counts at which pretraining scores MT40 (the time-to-quality curve), e.g. [2000, 5000, 10000]
    pretrain_eval_at: list[Int] = Field(default_factory=list)
    # a base file written by `pretrain rl --export FILE`: every trial starts from it instead of pretraining
    pretrained: str | None = None
    # optimiser, shared by pretraining and fine-tuning
    lr: Float = Field(1e-4, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    warmup: Int = Field(4000, ge=0)
    # the cosine's floor as a fraction of the trial's lr (harness.training.Schedule): the papers' 1e-6 at 1e-4
    min_lr_ratio: Float = Field(0.01, ge=0, le=1)
    grad_clip: Float = Field(0.25, ge=0)
    # evaluation and runtime
    eval_workers: Int = Field(0, ge=0)  # rollout processes; 0: min(episodes, the trial's cores)
    # a trial's evaluation episodes in 2 pipelined groups (each group's simulators step during the other's policy
    # forward) or in 1 (one forward for all, half the device calls); auto: 1 when the trial shares its GPU with
    # other trials (where each forward waits behind their kernels), else 2. The episodes are the same either way
    rollout_groups: Literal["auto", 1, 2] = "auto"
    eval_pretrained: Bool = True  # also score the pretrained DT on each trial's evaluation episodes
    # the return-to-go a DT is conditioned on in every evaluation (base, trials, pretraining curve), a rule over
    # the task's data episodes (agents/return_targets.py): max (the papers'), mean, quantile:Q, or success_max,
    # success_mean, success_quantile:Q over the episodes whose last step is a success (max when there are none);
    # the recipe's success_mean, the papers' max (preset paper)
    return_target: str = RECIPE_RULE
    compile: Bool = True
    # `python -m harness bench rl`
    bench_steps: Int = Field(50, ge=1)
    bench_envs: Int = Field(10, ge=1)
    # also profile the update (torch.profiler): where a step's time goes, by kernel class (issue 21)
    bench_profile: Bool = False

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        # a preset fills the keys the sweep file leaves out; an unknown name is left to the Literal's message
        if isinstance(data, dict) and data.get("preset", "recipe") in PRESETS:
            return {**PRESETS[data.get("preset", "recipe")], **data}
        return data

    @field_validator("pretrain_compile_mode")
    @classmethod
    def _pretrain_mode_needs_compile(cls, v: str, info: ValidationInfo) -> str:
        return mode_needs_compile("pretrain_compile_mode", v, info.data.get("compile"))

    @field_validator("return_target")
    @classmethod
    def _target_rule(cls, v: str) -> str:
        return canonical_rule(v)

    @field_validator("pretrain_eval_at")
    @classmethod
    def _eval_points(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError(f"update counts must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("noise_levels", "pretrain_tasks", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("pretrain_tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        for t in v:
            check_task(t, MT50)
        return v


# Offset of the selection stage's evaluation seed: rollouts.RolloutPool gives evaluation seed s the env
# seeds 10_007 s + 1_000_003 + i, so final seeds below this offset never share a start state with selection
# episodes, and the env seeds stay below 2**32.
SELECTION_EPISODES = 100_000


def episode_seed(seed: int, stage: str) -> int:
    """The evaluation seed of a trial's rollouts: the trial's seed, moved apart in the selection stage."""
    return SELECTION_EPISODES + int(seed) if stage == "select" else int(seed)


class RLBudget(TrackBudget):
    steps: Int = Field(100_000, ge=0)
    eval_episodes: Int = Field(10, ge=1)
    batch_size: Int = Field(128, ge=1)
    report_every: Int = Field(50, ge=0)
    # Both stages train alike; they are scored on different episodes: "select" on start states of their
    # own (evaluation seed SELECTION_EPISODES + seed), "final" on the seed's own, so the reported success
    # is never the number the settings were chosen on.
    stage: Literal["select", "final"] = "final"


def data_settings(ts: RLSettings) -> DataSettings:
    return DataSettings(episodes=ts.data_episodes, noise_levels=tuple(ts.noise_levels), seed=ts.data_seed,
                        expert=ts.expert)


def task_target(ts: RLSettings, task: str, data: Episodes | None = None) -> ReturnTarget:
    """The return ``task``'s evaluations condition the DT on: the study's rule ``return_target`` over the
    task's data (``data`` when the caller holds it, else read or built from the cache)."""
    return return_target(data if data is not None else load_dataset(task, data_settings(ts), _data_workers(ts)),
                         ts.return_target)


def task_targets(ts: RLSettings, tasks: Sequence[str]) -> dict[str, ReturnTarget]:
    """:func:`task_target` of every task in ``tasks``, their missing datasets built first in one process pool
    rather than one task at a time (BENCHMARKS.md has what that cost on a fresh H200 host)."""
    build_datasets(list(tasks), data_settings(ts), _data_workers(ts))
    return {t: task_target(ts, t) for t in tasks}


def model_config(ts: RLSettings) -> DTConfig:
    return DTConfig(n_layer=ts.n_layer, n_head=ts.n_head, n_embd=ts.n_embd, context=ts.context, dropout=ts.dropout,
                    residual_dtype=ts.residual_dtype)


def pretrain_plan(ts: RLSettings) -> PretrainPlan:
    warmup = ts.warmup if ts.pretrain_warmup is None else ts.pretrain_warmup
    optim = OptimPlan(steps=ts.pretrain_steps, lr=ts.pretrain_lr, weight_decay=ts.weight_decay, warmup=warmup,
                      min_lr_ratio=ts.min_lr_ratio, grad_clip=ts.grad_clip, batch_size=ts.pretrain_batch_size,
                      compile=ts.compile, compile_mode=ts.pretrain_compile_mode,
                      deterministic=ts.deterministic)
    return PretrainPlan(tasks=tuple(ts.pretrain_tasks), data=data_settings(ts), model=model_config(ts),
                        train=optim, seed=ts.pretrain_seed)


def check_pretrained(settings: RLSettings | dict[str, Any]) -> BaseFile | None:
    """The study's base file (setting ``pretrained``) opened and verified against its DT settings, before
    any compute (sweep validation calls this); None when the study pretrains its own base. Raises
    ConfigError for a missing, unreadable, altered or misfitting file."""
    ts = settings if isinstance(settings, RLSettings) else RLTrack().settings(settings)
    if not ts.pretrained:
        return None
    return read_base(ts.pretrained, model_config(ts))


def base_model(ts: RLSettings, device: torch.device | None = None) -> Pretrained:
    """The study's base: its ``pretrained`` file when set, else the MT40 pretraining (built or cached)."""
    base = check_pretrained(ts)
    if base is not None:
        return Pretrained(base.path, base.base_key, {"label": base.label, "sha256": base.sha256,
                                                     "eval": base.metadata.get("eval", {})})
    return build_pretrained(pretrain_plan(ts), device or pick_device(ts.device), _data_workers(ts))


def backbone_name(ts: RLSettings, pre: Pretrained) -> str:
    """The leaderboard's backbone column: the DT's shape, then in brackets (the weights, as on the vision
    track) the base file's name and short hash, or the base's key when the trials pretrained it themselves,
    so rows of two bases (e.g. two presets) never share a row; a return-target rule other than the papers'
    ``max`` is named there too (the recipe's ``success_mean`` included), so rows scored under different targets
    never share one either, and rows written before the rule existed (scored with ``max``) keep their name.
    The rule follows the weights after "; ", which ``harness.paper_refs`` reads as a departure from the
    papers' protocol (their numbers are not shown beside such rows)."""
    described = model_config(ts).describe()
    weights = pre.info["label"] if "label" in pre.info else f"base {pre.base_key}"
    rule = "" if ts.return_target == PAPERS_RULE else f"; return target {ts.return_target}"
    return f"{described} [{weights}{rule}]"


def rollout_workers(ts: RLSettings, episodes: int) -> int:
    return ts.eval_workers or max(1, min(episodes, usable_cpus()))


def rollout_groups(ts: RLSettings, device: torch.device, ray: RaySlice | None) -> int:
    """How many pipelined groups a trial's evaluation runs its episodes in (``ts.rollout_groups``; ``auto``:
    one on a GPU that the trial shares with others, ``ray``'s GPU share below one, else two)."""
    if ts.rollout_groups != "auto":
        return int(ts.rollout_groups)
    shared = device.type == "cuda" and ray is not None and 0 < ray.gpus < 1
    return 1 if shared else 2


def _data_workers(ts: RLSettings) -> int | None:
    return ts.data_workers or None


@torch.no_grad()
def window_score(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Minus the mean action MSE of ``model`` (in eval mode) on fixed windows of a task's data: how GLoRA's
    subnet search scores its candidates (rollouts for every candidate would cost thousands of episodes);
    higher is better. Under the trial's autocast, as its training and rollouts run: on a GPU an fp32 forward
    (no TF32) made each of a search's ~1,000 candidates cost several training steps (BENCHMARKS.md)."""
    was_training = model.training
    model.eval()
    with autocast(device):
        losses = torch.stack([batch_loss(model, b).float() for b in batches])
    model.train(was_training)
    return -float(np.mean(losses.tolist()))  # one device sync for the batches, the mean as before


class RLTrack(Track):
    name = "rl"
    Settings = RLSettings
    Budget = RLBudget
    benchmarks = {
        "cw10": Benchmark(name="cw10", tasks=tuple(CW10), primary_metric="success", tiebreak_metric="return"),
        "mt40": Benchmark(name="mt40", tasks=tuple(MT40), primary_metric="success", tiebreak_metric="return"),
    }
    model_varies_by_task = False  # one DT for every task: the task is in its data, not its shapes

    # --- stages ------------------------------------------------------------------------------------
    def make_data(self, settings: RLSettings, tasks: list[str] | None = None) -> dict[str, Any]:
        """Datasets of ``tasks`` (default: the pretraining tasks and CW10)."""
        tasks = list(tasks) if tasks else list(dict.fromkeys(settings.pretrain_tasks + CW10))
        for t in tasks:
            check_task(t)
        paths = build_datasets(tasks, data_settings(settings), _data_workers(settings))
        return {t: {"path": str(p), **Episodes.load(p).summary()} for t, p in paths.items()}

    def pretrain(self, settings: RLSettings, curve: str | None = None, export: str | None = None) -> dict[str, Any]:
        """The pretrained DT (cached), with its MT40 evaluation; ``pretrain_eval_at`` (or ``curve``, a JSON
        path for the time-to-quality curve) scores MT40 during the run; ``export`` writes it as a base file."""
        if settings.pretrained:
            raise ConfigError(f"setting 'pretrained'={settings.pretrained!r}: `pretrain` builds a base; drop "
                              "'pretrained' (trials and `prepare` load the file without pretraining)")
        plan = pretrain_plan(settings)
        if any(p > plan.train.steps for p in settings.pretrain_eval_at):
            raise ConfigError(f"setting 'pretrain_eval_at'={settings.pretrain_eval_at}: update counts must be <= "
                              f"pretrain_steps={plan.train.steps}")
        if export is not None and not str(export).endswith(".safetensors"):
            raise ConfigError(f"--export {export!r}: the base file's name must end in .safetensors")
        points = None
        if settings.pretrain_eval_at or curve:
            from pathlib import Path

            if settings.pretrain_eval_episodes < 1:
                raise ConfigError("a time-to-quality curve needs setting 'pretrain_eval_episodes' >= 1")
            points = CurveEval(at=tuple(settings.pretrain_eval_at), episodes=settings.pretrain_eval_episodes,
                               workers=rollout_workers(settings, 10**6), seed=0,
                               path=Path(curve) if curve else None, target_rule=settings.return_target)
        pre = build_pretrained(plan, pick_device(settings.device), _data_workers(settings), curve=points)
        result = {"path": str(pre.path), "base_key": pre.base_key,
                  **{k: pre.info[k] for k in ("final_loss", "steps_per_s", "wall_s", "params") if k in pre.info}}
        if points is not None:
            result["curve"] = [{k: v for k, v in p.items() if k != "tasks"} for p in points.points]
            _reuse_final_point(settings, pre, points)
        if settings.pretrain_eval_episodes > 0:
            result["eval"] = pretraining_eval(settings)
        if export is not None:
            from pathlib import Path

            scored = result.get("eval", {}).get("mean")  # with the conditions it was scored under
            scored = scored and {**scored, "episodes": settings.pretrain_eval_episodes,
                                 "return_target": settings.return_target}
            result["export"] = export_base(pre, plan, scored, Path(export))
        return result

    def check_inputs(self, settings: RLSettings, benchmark: str, tasks: list[str]) -> None:
        """The tasks, and a shared base file (``pretrained``): checksum, digest, config and shapes."""
        self.check_tasks(benchmark, tasks)
        check_pretrained(settings)

    def prepare(self, settings: RLSettings, benchmark: str, tasks: list[str], report: Report) -> dict[str, Any]:
        """The datasets of the pretraining and target tasks, and the pretrained DT (cached)."""
        self.check_tasks(benchmark, tasks)
        base = check_pretrained(settings)
        if base is not None:  # a shared base: no pretraining, no MT40 data; its evaluation is in the file
            build_datasets(list(tasks), data_settings(settings), _data_workers(settings))
            return {"checkpoint": str(base.path), "base_key": base.base_key, "base_file": base.label,
                    "pretraining_eval": base.metadata.get("eval", {})}
        build_datasets(list(dict.fromkeys(list(settings.pretrain_tasks) + list(tasks))), data_settings(settings),
                       _data_workers(settings))
        pre = build_pretrained(pretrain_plan(settings), pick_device(settings.device), _data_workers(settings))
        out: dict[str, Any] = {"checkpoint": str(pre.path), "base_key": pre.base_key}
        if settings.pretrain_eval_episodes > 0:
            out["pretraining_eval"] = pretraining_eval(settings)["mean"]
        return out

    def bench(self, settings: RLSettings) -> dict[str, Any]:
        return run_bench(settings, model_config(settings), RLBudget().batch_size,
                         rollout_workers(settings, settings.bench_envs))

    def shape_model(self, settings: RLSettings, benchmark: str):
        with torch.device("meta"):
            return DecisionTransformer(model_config(settings)), SITE.with_targets(tuple(settings.adapter_targets))

    def planned_work(self, spec) -> PlannedWork:
        """A fixed number of updates; each evaluation episode is the papers' 200 simulator steps."""
        return PlannedWork(int(spec.budget.steps), episode_steps=EPISODE_LENGTH)

    # --- one trial -----------------------------------------------------------------------------------
    def setup(self, spec, settings: RLSettings, budget: RLBudget, rng: TrialRandom, report: Report) -> FineTuneSetup:
        """The pretrained DT, the task's windows and the rollout evaluation."""
        ts, device = settings, pick_device(settings.device)
        plan = pretrain_plan(ts)
        pre = base_model(ts, device)

        model = DecisionTransformer(plan.model)  # as load_model, with the base read once per process
        model.load_state_dict(base_state(pre.path))
        model = model.to(device).eval()
        data = load_dataset(spec.task, plan.data, _data_workers(ts))
        chosen = task_target(ts, spec.task, data)
        target = chosen.value
        K, bs, episodes = plan.model.context, budget.batch_size, budget.eval_episodes
        eval_seed = episode_seed(spec.seed, budget.stage)
        sampler = WindowSampler(data, K, seed=derive_seed(spec.seed, "batches"), device=device)
        init_sampler = sampler.fork(derive_seed(spec.seed, "init-batches"))
        val_sampler = sampler.fork(derive_seed(spec.seed, "validation"))
        val_batches: list[dict[str, torch.Tensor]] = []

        def validate(m: torch.nn.Module) -> float:
            if not val_batches:
                val_batches.extend(val_sampler.sample(bs) for _ in range(4))
            return window_score(m, val_batches, device)

        # one pool of simulators for the trial's evaluations (a scheduler's rungs and the final one), spawned
        # now so that they start while the trial builds, compiles and trains
        rollouts = TrialRollouts(spec.task, episodes, rollout_workers(ts, episodes), eval_seed,
                                 groups=rollout_groups(ts, device, ray_slice()))
        rollouts.start()

        def evaluate(m: torch.nn.Module) -> tuple[dict[str, float], dict[str, Any]]:
            result = rollouts.evaluate(m, target, device)
            metrics = dict(result.metrics())
            if ts.eval_pretrained:
                base = task_eval(ts, spec.task, episodes, eval_seed)
                metrics.update(pretrained_success=base["success"], pretrained_success_any=base["success_any"],
                               pretrained_return=base["return"])
            ceiling = expert_eval(ts, spec.task, episodes, eval_seed)
            metrics.update(expert_success=ceiling["success"], expert_success_any=ceiling["success_any"])
            return metrics, {"eval_wall_s": round(result.wall_s, 2), "eval_groups": rollouts.groups,
                             "returns": [round(r, 1) for r in result.returns],
                             "stage": budget.stage, "eval_seed": eval_seed}

        optim = OptimPlan(steps=budget.steps, warmup=ts.warmup)
        schedule = Schedule(steps=budget.steps, lr=ts.lr, weight_decay=ts.weight_decay,
                            warmup=optim.effective_warmup(), min_lr_ratio=ts.min_lr_ratio, grad_clip=ts.grad_clip,
                            report_every=budget.report_every)
        return FineTuneSetup(
            model=model, site=SITE.with_targets(tuple(ts.adapter_targets)), device=device, schedule=schedule,
            next_batch=lambda: sampler.sample(bs), loss=batch_loss, evaluate=evaluate,
            base_key=pre.base_key, backbone=backbone_name(ts, pre), data_source=self.data_source(spec.benchmark),
            validate=validate, forward=forward_batch, layer_inputs=layer_tokens, compile=ts.compile,
            compile_mode=ts.compile_mode,
            close=rollouts.close,
            init_batches=lambda: [init_sampler.sample(bs) for _ in range(8)],
            facts={"data": DATA_NOTE, "data_episodes": ts.data_episodes, "noise_levels": list(ts.noise_levels),
                   "pretrain_tasks": len(plan.tasks), "pretrain_steps": plan.train.steps, "base_key": pre.base_key,
                   **chosen.facts(), "expert": data_settings(ts).policy_id,
                   **({"pretrained_file": pre.info["label"]} if "label" in pre.info else {})})


# --- the pretrained model's own scores ---------------------------------------------------------------

def pretraining_eval(ts: RLSettings, seed: int = 0) -> dict[str, Any]:
    """Pretrained vs untrained DT on every pretraining task (cached): does pretraining teach anything?"""
    episodes = ts.pretrain_eval_episodes
    _batched_task_evals(ts, list(ts.pretrain_tasks), episodes, seed)
    per_task = {task: {"pretrained": task_eval(ts, task, episodes, seed, untrained=False),
                       "untrained": task_eval(ts, task, episodes, seed, untrained=True)}
                for task in ts.pretrain_tasks}
    mean = {f"{which}_{m}": float(np.mean([r[which][m] for r in per_task.values()]))
            for which in ("pretrained", "untrained") for m in ("success", "success_any", "return")}
    print(f"[rl-pretrain] MT40 eval over {len(per_task)} task(s), {episodes} episodes each: "
          + ", ".join(f"{k} {v:.3g}" for k, v in mean.items()), flush=True)
    return {"mean": mean, "tasks": per_task}


def _task_eval_key(pre: Pretrained, task: str, episodes: int, seed: int, untrained: bool, target: float
                   ) -> dict[str, Any]:
    return {"base_key": pre.base_key, "task": task, "episodes": episodes, "seed": seed, "untrained": untrained,
            "target": target}


def pretrained_evals(ts: RLSettings, tasks: list[str], episodes: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The pretrained DT's scores on each of ``tasks`` (:func:`task_eval`'s, cached), all tasks' rollouts
    batched; no untrained reference (``python -m harness eval rl``)."""
    _batched_task_evals(ts, list(tasks), episodes, seed, with_untrained=False)
    return {t: task_eval(ts, t, episodes, seed) for t in tasks}


def _batched_task_evals(ts: RLSettings, tasks: list[str], episodes: int, seed: int,
                        with_untrained: bool = True) -> None:
    """Fill :func:`task_eval`'s cache for ``tasks`` with all their rollouts at once (one batched forward
    per step over every task's environments: the same start states, so the same episodes, as one task at a
    time; on a GPU the batch's kernels may round differently)."""
    plan = pretrain_plan(ts)
    device = pick_device(ts.device)
    pre = base_model(ts, device)
    cache = ArtifactCache()
    targets = {t: target.value for t, target in task_targets(ts, tasks).items()}
    for untrained in (False, True) if with_untrained else (False,):
        name = "untrained" if untrained else "pretrained"
        keys = {t: _task_eval_key(pre, t, episodes, seed, untrained, targets[t]) for t in tasks}
        missing = [t for t in tasks if cache.lookup(EVAL_KIND, f"{t}-{name}", keys[t]) is None]
        if len(missing) < 2:
            continue  # task_eval does one task as well
        if untrained:
            with seeded(derive_seed(plan.seed, "init")):
                model = DecisionTransformer(plan.model).to(device).eval()
        else:
            model = load_model(pre.path, plan.model, device)
        with TaskPools(missing, episodes, rollout_workers(ts, 10**6), seed) as pools:
            results = evaluate_dt_tasks(model, pools, targets, device)
        for t in missing:
            r = results[t]
            cached_eval(cache, f"{t}-{name}", keys[t], lambda r=r: {
                "success": r.success, "success_any": r.success_any, "return": r.return_mean, "wall_s": r.wall_s})


def _reuse_final_point(ts: RLSettings, pre: Pretrained, points: CurveEval) -> None:
    """The curve's last point scored the finished model on the episodes :func:`pretraining_eval` uses:
    its per-task scores go into that evaluation's cache instead of being rolled out again."""
    final = next((p for p in points.points if p["updates"] == ts.pretrain_steps), None)
    # points written before the rule existed were scored with max, the papers' rule
    if (final is None or points.seed != 0 or points.episodes != ts.pretrain_eval_episodes
            or final.get("return_target", PAPERS_RULE) != ts.return_target):
        return
    plan = pretrain_plan(ts)
    for task, scores in final["tasks"].items():
        key = _task_eval_key(pre, task, points.episodes, 0, False, task_target(ts, task).value)
        cached_eval(ArtifactCache(), f"{task}-pretrained", key, lambda s=scores: {**s, "wall_s": final["eval_s"]})


def task_eval(ts: RLSettings, task: str, episodes: int, seed: int, untrained: bool = False) -> dict[str, Any]:
    """Rollout scores of the pretrained (or, as a reference, a randomly initialised) DT on ``task``; cached."""
    check_task(task)
    plan = pretrain_plan(ts)
    device = pick_device(ts.device)
    pre = base_model(ts, device)
    target = task_target(ts, task).value
    key = _task_eval_key(pre, task, episodes, seed, untrained, target)

    def compute() -> dict[str, Any]:
        if untrained:
            with seeded(derive_seed(plan.seed, "init")):
                model = DecisionTransformer(plan.model).to(device).eval()
        else:
            model = load_model(pre.path, plan.model, device)
        r = evaluate_dt(model, task, episodes, target, rollout_workers(ts, episodes), seed, device)
        return {"success": r.success, "success_any": r.success_any, "return": r.return_mean, "wall_s": r.wall_s}

    return cached_eval(ArtifactCache(), f"{task}-{'untrained' if untrained else 'pretrained'}", key, compute)


def expert_eval(ts: RLSettings, task: str, episodes: int, seed: int) -> dict[str, Any]:
    """The task's data ceiling: the noise-free expert of the data (its hold mode included) on the
    evaluation episodes of ``seed`` (the start states the DT is scored on); cached."""
    check_task(task)
    ds = data_settings(ts)
    hold = expert_hold(task, ds.episode_length)["mode"] if ds.expert == "hold" else None
    key = {"task": task, "episodes": episodes, "seed": seed, "policy": ds.policy_id, "hold": hold}

    def compute() -> dict[str, Any]:
        r = evaluate_scripted(task, episodes, rollout_workers(ts, episodes), seed, 0.0, ds.episode_length, hold)
        return {"success": r.success, "success_any": r.success_any, "return": r.return_mean, "wall_s": r.wall_s}

    return cached_eval(ArtifactCache(), f"{task}-expert", key, compute)


def data_report(ts: RLSettings, tasks: list[str] | None, out) -> str:
    """``python -m harness data rl --report``: the expert data's per-task table (default: all 50 tasks,
    MT40 then CW10), written as JSON and CSV under ``out``; returns the printed text."""
    from pathlib import Path

    tasks = list(tasks) if tasks else list(MT40) + list(CW10)
    report = build_report(tasks, data_settings(ts), _data_workers(ts))
    paths = write_report(report, Path(out))
    mean = report["noise_free_mean"]
    return "\n".join([format_report(report), "",
                      f"noise-free expert ({report['expert']}), mean over {len(tasks)} tasks: last-step "
                      f"{mean.get('success_last', float('nan')):.3f}, any-step {mean.get('success_any', float('nan')):.3f}",
                      "noise-free last-step below any-step by more than 0.05: "
                      + (", ".join(report["not_holding"]) or "none"),
                      *[f"written: {p}" for p in paths]])

"""``python -m harness eval rl --pretrained FILE``: an exported base scored in the simulator, no pretraining.

The file (``python -m harness pretrain rl --export FILE``) carries its DT's config and the settings of the
data it was pretrained on; the evaluation rebuilds (or reads from the cache) exactly that data, since each
task's return target is a rule over it (``return_target``, ``agents.return_targets``), then rolls out the
DT on every task at once (one batched forward per step) with the start states of ``eval_seed``. Scores are
cached per (base, task, episodes, seed, target) like the track's own evaluations: a second rule that gives
a task the same target costs nothing, and a pretraining's own MT40 evaluation is reused.

Keys (``--set``): ``tasks`` (default: the file's pretraining tasks; any MT50 task), ``eval_episodes``
(per task, default 10), ``eval_seed`` (default 0, the start states of the pretraining's evaluation), and the
track settings that do not change the base: ``return_target``, ``eval_workers``, ``data_workers``,
``device``. The DT and the data come from the file; setting them is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.errors import ConfigError
from harness.validation import Int, validate
from harness.training import pick_device
from agents.data import DataSettings
from agents.pretrain import BaseFile, read_base
from agents.return_targets import canonical_rule
from agents.tasks import EPISODE_LENGTH, EXPERTS, MT50, check_task
from agents.track import RLSettings, RLTrack, data_settings, pretrained_evals, task_targets

# RLSettings keys an evaluation may set: how it runs and what it conditions on, never what the base is
RUNTIME_KEYS = ("return_target", "eval_workers", "data_workers", "device")


class BaseEval(BaseModel):
    """What to evaluate: tasks, episodes per task, start states, return-target rule, runtime."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] | None = Field(None, min_length=1)  # None: the file's pretraining tasks
    eval_episodes: Int = Field(10, ge=1)
    eval_seed: Int = Field(0, ge=0)
    return_target: str | None = None  # None: the RL track's default (the recipe's rule)
    eval_workers: Int = Field(0, ge=0)
    data_workers: Int = Field(0, ge=0)
    device: str = "auto"

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str] | None) -> list[str] | None:
        for t in v or ():
            check_task(t, MT50)
        return list(dict.fromkeys(v)) if v else v

    @field_validator("return_target")
    @classmethod
    def _rule(cls, v: str | None) -> str | None:
        return None if v is None else canonical_rule(v)


def _expert_of(policy: str, where: str) -> str:
    """The ``expert`` setting whose data carries ``policy`` (the data key's id) in this harness version."""
    for expert in EXPERTS:
        if DataSettings(expert=expert).policy_id == policy:
            return expert
    made = ", ".join(f"{DataSettings(expert=e).policy_id} (expert: {e})" for e in EXPERTS)
    raise ConfigError(f"{where}: its data was made by expert policy {policy!r}, which this harness version does not "
                      f"make (it makes {made}); the return targets cannot be rebuilt from the same data")


def eval_settings(path: str | Path, config: dict[str, Any] | None = None) -> tuple[RLSettings, BaseEval, BaseFile]:
    """The RL settings that reproduce the base file's DT and data, the evaluation's own keys, and the
    verified file; every ConfigError (file, keys, tasks, rule) comes from here, before any compute."""
    config = dict(config or {})
    fixed = sorted(k for k in config if k in RLSettings.model_fields and k not in RUNTIME_KEYS)
    if fixed:
        raise ConfigError(f"eval --set {', '.join(map(repr, fixed))}: the DT and the data it is scored against come "
                          f"from the base file (--pretrained); valid keys: "
                          f"{', '.join(BaseEval.model_fields)}")
    ev = validate(BaseEval, config, "eval rl", "eval key")
    base = read_base(path)
    where = f"--pretrained {str(path)!r}"
    meta = base.metadata
    try:
        data, tasks = meta["data"], meta["tasks"]
        episodes, noise, seed, length, policy = (data["episodes"], data["noise_levels"], data["seed"],
                                                 data["episode_length"], data["policy"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: the file's metadata lacks its data settings ({e}); a base written by "
                          "`python -m harness pretrain rl --export FILE` has them") from e
    if length != EPISODE_LENGTH:
        raise ConfigError(f"{where}: its data has episodes of {length} steps; this harness evaluates "
                          f"{EPISODE_LENGTH}-step episodes")
    raw = {"n_layer": base.model.n_layer, "n_head": base.model.n_head, "n_embd": base.model.n_embd,
           "context": base.model.context, "dropout": base.model.dropout, "data_episodes": episodes,
           "noise_levels": noise, "data_seed": seed, "expert": _expert_of(policy, where), "pretrain_tasks": tasks,
           "pretrain_seed": meta.get("seed", 0), "pretrained": str(path), "pretrain_eval_episodes": ev.eval_episodes,
           **{k: getattr(ev, k) for k in RUNTIME_KEYS if getattr(ev, k) is not None}}
    ts = RLTrack().settings(raw, "eval rl")
    if data_settings(ts).key("*") != data:  # the file's data key must be the one this harness builds
        raise ConfigError(f"{where}: its data settings {data} do not map onto this harness's "
                          f"({data_settings(ts).key('*')})")
    return ts, ev, base


def evaluate_base(path: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the base file ``path`` on its tasks (or ``config['tasks']``): per task and mean, last-step and
    any-step success and return, with the target each task was conditioned on (see the module's doc)."""
    ts, ev, base = eval_settings(path, config)
    tasks = ev.tasks or list(ts.pretrain_tasks)
    targets = task_targets(ts, tasks)  # builds (or reads) the file's data for every task
    scores = pretrained_evals(ts, tasks, ev.eval_episodes, ev.eval_seed)
    per_task = {t: {"success": scores[t]["success"], "success_any": scores[t]["success_any"],
                    "return": scores[t]["return"], "target": targets[t].value,
                    "target_episodes": targets[t].episodes, "target_fallback": targets[t].fallback}
                for t in tasks}
    mean = {m: float(np.mean([r[m] for r in per_task.values()])) for m in ("success", "success_any", "return")}
    return {"file": str(base.path), "label": base.label, "base_key": base.base_key, "return_target": ts.return_target,
            "eval_episodes": ev.eval_episodes, "eval_seed": ev.eval_seed, "data": base.metadata.get("data"),
            "file_eval": base.metadata.get("eval", {}), "device": str(pick_device(ts.device)), "mean": mean,
            "tasks": per_task}


def format_eval(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table, one row per task and a mean row."""
    lines = [f"{result['label']} (base {result['base_key']}), {result['eval_episodes']} episodes per task, "
             f"evaluation seed {result['eval_seed']}, return target rule {result['return_target']}", "",
             "| task | last-step success | any-step success | return | target |", "|---|---:|---:|---:|---:|"]
    for task, r in result["tasks"].items():
        target = f"{r['target']:.0f}" + (" (no successful episode: max)" if r["target_fallback"] else "")
        lines.append(f"| {task} | {r['success']:.3f} | {r['success_any']:.3f} | {r['return']:.0f} | {target} |")
    m = result["mean"]
    lines.append(f"| mean of {len(result['tasks'])} | {m['success']:.4f} | {m['success_any']:.4f} | "
                 f"{m['return']:.0f} | |")
    return "\n".join(lines)

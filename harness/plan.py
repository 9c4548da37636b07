"""A sweep's price before compute: ``python -m harness sweep FILE --plan``.

Per study, stage and wave: trials, updates (epochs x images for vision), and the GPU-hours and wall time
they are expected to take on the GPUs given, priced from measured per-update costs of the GPU model
(``benchmarks/update-costs.json``, copied from the bench JSONs it names). Nothing is computed, written
or started: the sweep file is validated as a sweep validates it, and no Ray instance is started
(``--address`` only reads a running cluster's GPU count and model).

The model of a wave: ``p`` trials share a GPU (``gpus_per_trial``, or auto's share for the wave on these
GPUs); ``p`` trials on one GPU train ``speedup(p)`` times as fast in all as one alone (measured for the
paper DT, interpolated between measured counts); the GPUs a wave occupies are the ones its concurrent
trials need; evaluation (RL rollouts, priced from the measured DT rollout rate; a selection trial under a scheduler
evaluates also at each rung it reaches) holds a trial's share
of its GPU, and so do a trial's start-up, wrap, compilation and save where the device entry has them
measured (``trial_overhead``, from finished trials' records: ``costs RESULTS --overheads``), and its
end-of-training step (GLoRA's subnet search) for the trials expected to reach the end of their budget.
Selection under ASHA or synchronous halving (``sha``) is priced at
:func:`harness.early_stopping.expected_selection_work`: a share of the full grid's updates, the rung
evaluations and the share of trials that reach the end, for each (method, task) group at its own size
(under ASHA a small group saves little; under ``sha`` the share follows from the group's size alone).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.early_stopping import eval_points, expected_selection_work, parse_scheduler
from harness.errors import ConfigError
from harness.methods import base_name
from harness.placement import auto_gpu_share, check_reachable, visible_gpus
from harness.sweep_file import (Study, SweepFile, expand_grid, method_waves, selection_methods, study_tasks,
                                study_trials)
from harness.tracks import get_track
from harness.trial import ResolvedTrial

COSTS = Path(__file__).resolve().parents[1] / "benchmarks" / "update-costs.json"


def load_costs(path: Path = COSTS) -> dict[str, Any]:
    """The measured cost table (one entry per GPU model)."""
    return json.loads(Path(path).read_text())["devices"]


def packing_speedup(per_gpu: int, packing: dict[str, Any] | None, kind: str = "compiled") -> float:
    """Aggregate training throughput of ``per_gpu`` trials on one GPU, relative to one alone, for trials whose
    step is of ``kind`` (:func:`_step_kind`; the entry's own figure is the default mode's, a ``compiled:MODE``
    key another mode's): the measured counts, linear in between, the largest measured count's figure beyond
    it (1.0 without a measurement)."""
    if per_gpu <= 1 or not packing:
        return 1.0
    points = sorted((int(k), float(v)) for k, v in packing.get(kind, packing)["speedup"].items())
    for (k0, v0), (k1, v1) in zip(points, points[1:]):
        if k0 <= per_gpu <= k1:
            return v0 + (v1 - v0) * (per_gpu - k0) / (k1 - k0)
    return points[-1][1]


@dataclass
class TrialCost:
    """One trial's priced work: updates and seconds on a GPU of its own."""

    updates: int | None
    train_s: float | None
    eval_s: float  # the trial's first evaluation
    images: int | None = None  # vision: training images per epoch
    epochs: int | None = None
    source: str = ""  # which measurement priced it, or why none did
    # start-up, wrap, compilation and save, paid by every trial that runs: measured on finished trials (the
    # device entry's ``trial_overhead``, written by ``costs RESULTS --overheads``); 0 where none was measured
    overhead_s: float = 0.0
    # the end-of-training step (GLoRA's subnet search), measured likewise: paid only by a trial that reaches
    # the end of its budget, so a scheduler that stops a trial at a rung saves it
    end_overhead_s: float = 0.0
    # each evaluation after the first (a scheduler's rungs come before the final one), where it is cheaper:
    # RL trials keep their simulator workers (agents.rollout.TrialRollouts); None: as the first
    later_eval_s: float | None = None

    def evals_s(self, evaluations: float) -> float:
        """Seconds of ``evaluations`` evaluations (1 + the rung evaluations a trial is expected to make)."""
        later = self.eval_s if self.later_eval_s is None else self.later_eval_s
        return self.eval_s + max(0.0, evaluations - 1) * later


@dataclass
class WavePlan:
    study: str
    stage: str
    wave: int
    trials: int
    updates: int | None  # all trials together (after the scheduler's expected share)
    gpu_hours: float | None
    wall_hours: float | None
    per_gpu: int  # trials sharing one GPU
    gpus_used: int
    notes: list[str] = field(default_factory=list)
    epochs_x_images: str = ""


def _step_kind(ts: Any) -> str:
    """The cost table's key for a trial's kind of step: ``eager``, ``compiled`` (torch.compile's default
    mode) or ``compiled:MODE`` (another ``compile_mode``, e.g. ``compiled:reduce-overhead``)."""
    if not ts.compile:
        return "eager"
    mode = getattr(ts, "compile_mode", "default")
    return "compiled" if mode == "default" else f"compiled:{mode}"


def _measured_ms(table: dict[str, dict[str, float]], kind: str, method: str) -> tuple[str, float] | None:
    """``method``'s ms per update for a step of ``kind``, or the nearest slower kind measured: another compile
    mode falls back to the default mode's figure (the graphs' modes were never measured slower), compiled
    to eager (an upper bound). None where no kind has it."""
    order = [kind] + (["compiled"] if kind.startswith("compiled:") else []) + ["eager"]
    for k in order:
        if method in table.get(k, {}):
            return k, table[k][method]
    return None


def _fallback_note(kind: str, used: str, what: str) -> str:
    return "" if used == kind else f" for {what} ({kind} not measured)"


def _rl_cost(spec: ResolvedTrial, study: Study, device: dict[str, Any] | None) -> TrialCost:
    ts, budget = spec.track_settings, spec.budget
    work = get_track(spec.track).planned_work(spec)
    updates = work.updates
    m = (device or {}).get("rl")
    shape = {"n_layer": ts.n_layer, "n_head": ts.n_head, "n_embd": ts.n_embd, "context": ts.context}
    if m is None:
        return TrialCost(updates, None, 0.0, source="no RL measurement for this device")
    if m["model"] != shape or int(m["batch_size"]) != int(budget.batch_size):
        return TrialCost(updates, None, 0.0, source=f"no measurement of this DT ({shape}, batch {budget.batch_size}); "
                                                   f"measured: {m['model']}, batch {m['batch_size']}")
    kind = _step_kind(ts)
    used, ms = _measured_ms({k: {"full": v} for k, v in m["ms_per_update"].items()}, kind, "full")
    envs = int(m["rollout_envs"])
    per_env = float(m["rollout_env_steps_per_s"]) / envs
    episodes = int(budget.eval_episodes)
    eval_s = episodes * work.episode_steps / (per_env * min(episodes, envs))
    source = f"{used} {ms} ms/update{_fallback_note(kind, used, 'the DT')}, rollouts {eval_s:.0f} s/trial"
    later = None
    if m.get("rollout_kept_env_steps_per_s"):  # bench rl's second evaluation on a kept pool of workers
        later = episodes * work.episode_steps / (float(m["rollout_kept_env_steps_per_s"]) / envs * min(episodes, envs))
        source += f" ({later:.0f} s for each later one, on the trial's kept workers)"
    return TrialCost(updates, updates * ms / 1000, eval_s, source=source, later_eval_s=later)


def _vision_cost(spec: ResolvedTrial, study: Study, device: dict[str, Any] | None) -> TrialCost:
    ts, budget = spec.track_settings, spec.budget
    work = get_track(spec.track).planned_work(spec)
    updates = work.updates
    m = (device or {}).get("vision")
    cost = TrialCost(updates, None, 0.0, images=work.images, epochs=work.epochs)
    if updates is None:
        cost.source = f"{spec.benchmark}: images per split are known only once its data is loaded; set budget.steps"
        return cost
    size = ts.img_size or 224
    if m is None:
        cost.source = "no vision measurement for this device"
        return cost
    if not ts.backbone.startswith(m["backbone"]) or size != m["img_size"] or budget.batch_size != m["batch_size"]:
        cost.source = (f"no measurement of {ts.backbone} at {size} px, batch {budget.batch_size}; measured: "
                       f"{m['backbone']} at {m['img_size']} px, batch {m['batch_size']}")
        return cost
    kind = _step_kind(ts)
    method = base_name(spec.method)  # glora@0.29M is priced as glora
    found = _measured_ms(m["ms_per_update"], kind, method)
    if found is None:
        cost.source = f"no measurement of method {method!r}"
        return cost
    used, ms = found
    cost.train_s = updates * ms / 1000
    cost.source = f"{used} figures{_fallback_note(kind, used, method)}"
    return cost


def trial_cost(spec: ResolvedTrial, study: Study, device: dict[str, Any] | None) -> TrialCost:
    """One trial priced on ``device``'s measurements (None: no measurement for this GPU model)."""
    if spec.track == "rl":
        return _rl_cost(spec, study, device)
    if spec.track == "vision":
        return _vision_cost(spec, study, device)
    return TrialCost(None, None, 0.0, source=f"track {spec.track!r} has no cost model")


def trial_overhead(spec: ResolvedTrial, stage: str, device: dict[str, Any] | None) -> tuple[float, float, str]:
    """Seconds a trial of ``stage`` ("select" or "final") spends besides training and evaluating, from the
    device entry of its track (``trial_overhead``, as ``costs RESULTS --overheads`` writes it), each the mean
    of the trial's method in that stage, else of all its trials: (what every trial that runs pays: a worker's
    start-up plus ``seconds``; what only a trial that reaches the end of its budget pays: ``end_seconds``,
    GLoRA's search; the measurement's name). An entry written before ``end_seconds`` is still read: its
    ``seconds`` hold both parts, averaged over trials that ran to their end, and are priced as paid by every
    trial (too high for the trials a scheduler stops). (0, 0, "") without a measurement."""
    m = ((device or {}).get(spec.track) or {}).get("trial_overhead")
    if not m:
        return 0.0, 0.0, ""

    def mean(key: str) -> float:
        by_stage = m.get(key) or {}
        table = by_stage.get(stage) or by_stage.get("final") or {}
        own = table.get(spec.method, table.get(base_name(spec.method)))
        return float(own if own is not None else table.get("default", 0.0))

    said = f"per-trial overheads from {m['source']}"
    return float(m.get("start_s", 0.0)) + mean("seconds"), mean("end_seconds"), said


def plan_wave(study: Study, stage: str, wave: int, specs: list[ResolvedTrial], gpus: int,
              device: dict[str, Any] | None, update_share: float = 1.0, rung_reports: float = 0.0,
              end_shares: dict[tuple[str, str], float] | None = None,
              restarts: tuple[float, int] = (0.0, 0)) -> WavePlan:
    """Price one wave of trials on ``gpus`` GPUs. ``update_share``: the share of each trial's updates a
    selection scheduler is expected to spend; ``rung_reports``: the intermediate scores (one evaluation
    each, as long as the final one) it is expected to ask of each trial; ``end_shares``: per (method, task)
    group, the share of its trials the scheduler is expected to let reach the end of their budget, the only
    ones that pay :attr:`TrialCost.end_overhead_s` (a group not in it: all of them); ``restarts``: how often a
    trial starts again from a checkpoint, on average and at most (synchronous halving resumes the trials it
    promotes at each rung), each paying the trial's start-up overheads again."""
    costs = [trial_cost(s, study, device) for s in specs]
    # per group, not one share for the stage: the end-only overhead is one method's (GLoRA's search), and its
    # groups' size, not the stage's mix of sizes, sets how many of its trials reach the end
    reach = [(end_shares or {}).get((s.method, s.task), 1.0) for s in specs]
    overhead_notes = set()
    for spec, c in zip(specs, costs):
        if c.train_s is not None:  # measured for this model: its overheads too, where they were measured
            c.overhead_s, c.end_overhead_s, said = trial_overhead(spec, stage.split(" ")[0], device)
            overhead_notes.add(said)
    n = len(specs)
    r = study.resources
    share = auto_gpu_share(n, gpus) if r.gpus_per_trial == "auto" else float(r.gpus_per_trial)
    per_gpu = max(1, round(1 / share)) if share > 0 else 0
    notes = sorted({c.source for c in costs} | overhead_notes - {""})
    updates = None if any(c.updates is None for c in costs) else round(sum(c.updates for c in costs) * update_share)
    shown = ""
    if costs and costs[0].images:
        shown = f"{costs[0].epochs} epochs x {costs[0].images} images"
    out = WavePlan(study.name, stage, wave, n, updates, None, None, per_gpu, 0, notes, shown)
    if gpus <= 0 or per_gpu == 0:
        out.notes.append("no GPU for these trials: not priced")
        return out
    if any(c.train_s is None for c in costs):
        return out
    packing = (device or {}).get("packing")
    kind = _step_kind(specs[0].track_settings) if specs else "compiled"
    speed = packing_speedup(per_gpu, packing, kind)
    concurrent = min(n, gpus * per_gpu, r.max_concurrent or n)
    out.gpus_used = min(gpus, math.ceil(concurrent / per_gpu))
    # a GPU's time: its trials' training at the packed rate, and their evaluations and overheads each
    # holding one of its p shares
    evals = 1 + rung_reports
    starts, most_starts = 1 + restarts[0], 1 + restarts[1]
    gpu_s = sum(c.train_s * update_share / speed
                + (c.evals_s(evals) + starts * c.overhead_s + r * c.end_overhead_s) / per_gpu
                for c, r in zip(costs, reach))
    # the longest trial pays its end-only overhead in full: under ASHA the first trial of a group to reach a rung
    # always goes on, so every group has one that reaches the end
    longest = max(c.train_s * update_share * per_gpu / speed + c.evals_s(evals) + most_starts * c.overhead_s
                  + c.end_overhead_s for c in costs)
    if rung_reports:
        out.notes.append(f"{rung_reports:.2g} rung evaluations per trial")
    if restarts[0]:
        out.notes.append(f"{restarts[0]:.2g} restarts from a rung checkpoint per trial, each with the start-up "
                         "overheads")
    if any(c.end_overhead_s for c in costs) and min(reach) < 1.0:
        out.notes.append(f"end-of-training overheads for the {sum(reach) / n:.2g} of trials expected to reach the end")
    out.gpu_hours = gpu_s / 3600
    out.wall_hours = max(gpu_s / out.gpus_used, longest) / 3600
    if per_gpu > 1:
        said = ""
        if kind in (packing or {}):
            said = f" ({kind}: {packing[kind]['source'].split(':')[0]})"
        elif packing and kind != "compiled":  # as _measured_ms falls back, and says so
            said = f" (torch.compile's default mode's figure; {kind} not measured)"
        out.notes.append(f"{per_gpu} trials per GPU at {speed:.3g}x one trial's rate in all{said}")
    return out


def plan_sweep(sweep: SweepFile, gpus: int, device_name: str, costs: dict[str, Any] | None = None
               ) -> tuple[list[WavePlan], str]:
    """Every study's waves priced on ``gpus`` GPUs of model ``device_name``; (waves, which measurement)."""
    costs = load_costs() if costs is None else costs
    device = costs.get(device_name)
    if device is None:
        said = (f"no measurement for this device ({device_name or 'no GPU'}): run `python -m harness bench rl` "
                f"and `python -m harness bench methods` on it and add the figures to {COSTS.name}, or pass "
                f"--gpu-model with one of: {', '.join(sorted(costs))}")
    else:
        said = "measured on " + device_name + ": " + "; ".join(
            f"{k}: {v['source']}" for k, v in device.items() if isinstance(v, dict) and "source" in v)
    out: list[WavePlan] = []
    for study in sweep.studies:
        waves = method_waves(list(study.methods))
        # (stage, trials, update share, rung evaluations per trial, share reaching the end per group,
        # restarts from a rung checkpoint per trial on average and at most)
        stages: list[tuple[str, list[ResolvedTrial], float, float, dict[tuple[str, str], float],
                           tuple[float, int]]] = []
        if study.protocol == "select-then-final":
            selecting = selection_methods(study)
            sched = parse_scheduler(study.selection.scheduler_settings())
            specs = [s for s in study_trials(study, "select") if s.method in selecting]
            max_t = (trial_cost(specs[0], study, None).updates or 0) if specs else 0
            groups = Counter((s.method, s.task) for s in specs)  # a scheduler per (method, task) group
            share, rungs, restarts = 1.0, 0.0, (0.0, 0)
            work = {key: expected_selection_work(sched, max_t, n) for key, n in groups.items()}
            if specs:
                share = sum(n * work[key][0] for key, n in groups.items()) / len(specs)
                rungs = sum(n * work[key][1] for key, n in groups.items()) / len(specs)
                if sched is not None and sched.name == "sha":  # each promoted trial resumes from its rung
                    resumed = sum(n * (work[key][1] - 1 + work[key][2]) for key, n in groups.items())
                    restarts = (resumed / len(specs), len(eval_points(sched, max_t)))
            stages.append(("select" + (f" [{sched.label()}]" if sched else ""), specs, share, rungs,
                           {key: w[2] for key, w in work.items()}, restarts))
            first = {(m, t): expand_grid(space, m)[0] for m, space in study.methods.items() for t in study_tasks(study)}
            stages.append(("final", study_trials(study, "final", first), 1.0, 0.0, {}, (0.0, 0)))
        else:
            stages.append(("final", study_trials(study, "final"), 1.0, 0.0, {}, (0.0, 0)))
        for stage, specs, share, rungs, reach, restarts in stages:
            for i, names in enumerate(waves):
                wave = [s for s in specs if s.method in names]
                if wave:
                    out.append(plan_wave(study, stage, i, wave, gpus, device, share, rungs, reach, restarts))
    return out, said


def format_plan(waves: list[WavePlan], said: str, gpus: int, device_name: str) -> str:
    """The plan as a table, with totals and the measurement it used."""
    width = max([8] + [len(w.stage) + 2 for w in waves])
    lines = [f"Plan on {gpus} GPU(s) ({device_name or 'none'}): nothing is computed, written or started.",
             f"Per-update costs: {said}", "",
             f"{'study':<14}{'stage':<{width}}{'wave':>4}{'trials':>8}{'updates':>14}{'GPU-h':>10}{'wall-h':>9}"
             f"{'per GPU':>8}  notes"]
    gpu_h, wall_h, upd, priced = 0.0, 0.0, 0, True
    for w in waves:
        fmt = lambda v: f"{v:.2f}" if v is not None else "?"  # noqa: E731
        lines.append(f"{w.study:<14}{w.stage:<{width}}{w.wave:>4}{w.trials:>8}"
                     f"{(f'{w.updates:,}' if w.updates is not None else '?'):>14}{fmt(w.gpu_hours):>10}"
                     f"{fmt(w.wall_hours):>9}{w.per_gpu:>8}  {'; '.join(filter(None, [w.epochs_x_images] + w.notes))}")
        upd += w.updates or 0
        if w.gpu_hours is None:
            priced = False
        else:
            gpu_h += w.gpu_hours
            wall_h += w.wall_hours
    lines.append("")
    lines.append(f"total: {sum(w.trials for w in waves)} trials, {upd:,} updates, "
                 + (f"{gpu_h:.1f} GPU-hours, {wall_h:.1f} h wall (waves one after another)" if priced
                    else "not fully priced (see notes)"))
    overheads = any("per-trial overheads" in n for w in waves for n in w.notes)
    lines.append("The final stage is priced at each method's first grid point's cost; wall time assumes the "
                 "GPUs do nothing else and leaves out " + ("data preparation and pretraining (each trial's "
                 "start-up, wrap, compilation and save are priced as measured in finished trials' records, and "
                 "the end-of-training search for the trials expected to reach it: see the notes)." if overheads
                 else "start-up, data preparation and pretraining."))
    return "\n".join(lines)


def local_gpus() -> tuple[int, str]:
    """This machine's visible GPUs and their model (no Ray)."""
    n = visible_gpus()
    if n == 0:
        return 0, ""
    import torch

    return n, torch.cuda.get_device_name(0)


def cluster_gpus(address: str) -> tuple[int, str]:
    """A running Ray cluster's GPU count and model (its ``accelerator_type:`` resource), read without
    starting anything."""
    import ray

    check_reachable(address)
    ray.init(address=address, log_to_driver=False)
    try:
        res = ray.cluster_resources()
        kinds = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        return int(res.get("GPU", 0)), ("NVIDIA " + kinds[0]) if kinds else ""
    finally:
        ray.shutdown()


def priced_gpus(gpus: int | None, address: str | None, gpu_model: str | None) -> tuple[int, str]:
    """The GPUs a plan prices: a cluster's own (``address``), else this host's or ``gpus`` of them; the
    model ``gpu_model`` where given, else theirs."""
    if gpus is not None and gpus < 0:
        raise ConfigError(f"--gpus {gpus}: a count of GPUs is 0 or more")
    if address:
        if gpus is not None:
            raise ConfigError("--plan with --address prices the cluster's own GPUs: leave out --gpus")
        n, name = cluster_gpus(address)
    else:
        n, name = local_gpus()
        if gpus is not None:
            n = gpus
    return n, gpu_model or name


def run_plan(sweep: SweepFile, gpus: int | None, address: str | None, gpu_model: str | None) -> str:
    """What ``sweep --plan`` prints."""
    n, name = priced_gpus(gpus, address, gpu_model)
    waves, said = plan_sweep(sweep, n, name)
    return format_plan(waves, said, n, name)


__all__ = ["TrialCost", "WavePlan", "format_plan", "load_costs", "packing_speedup", "plan_sweep", "plan_wave",
           "priced_gpus", "run_plan", "trial_cost", "trial_overhead"]

"""The Ray Tune driver: one Tune experiment per wave of trials, resumable, CPU-only or fractional GPUs.

A study runs in waves: with the select-then-final protocol, first the selection grid (training split ->
validation), then the final runs of the chosen settings (train+val -> test); within a stage, a method
that declares it builds on other methods' adapters (``Method.builds_on``: EigenLoRA on LoRA's) runs in a
wave after theirs. Each wave is a Tune experiment under ``<results>/<sweep>/<study>-<stage>[-waveN]``;
``--resume`` restores an interrupted one with ``Tuner.restore`` (finished trials are kept, not rerun) and
skips finished ones. The driver knows nothing of tracks beyond their declarations (``harness/tracks.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import experiment_logging
from harness.cache import atomic_write_text, cache_root
from harness.costs import record_updates
from harness.early_stopping import RUNG_KEY, TIME_ATTR, interleave_groups, parse_scheduler, rung_value
from harness.errors import ConfigError, HarnessError
from harness.methods import base_name, get_method
from harness.placement import auto_gpu_share, check_reachable, host_cpus, start_delays, visible_gpus
from harness.plugins import load_plugins
from harness.process_cache import on_trial_thread, reuse_actors, route_by_structure, share_compiled, share_graphs
from harness.shared_storage import check_shared_cache
from harness.sweep_file import (Study, SweepFile, grid_size, method_waves, resolved_grid, selection_methods,
                                study_tasks, study_trials, track_settings)
from harness.tracks import get_track
from harness.trial import ResolvedTrial, TrialRecord, print_reporter, spec_key


class TrialFailed(HarnessError):
    """Raised in a Tune trial whose record says it failed (an error or a non-finite loss)."""


def _trial_label(spec: ResolvedTrial) -> str:
    return f"{spec.task} {spec.method} seed {spec.seed}"


FAILED_RECORD = "harness-failed-record.json"  # in the trial's folder: a deterministic failure, kept
MAX_RETRIES = 2  # attempts after a trial's process or node died (infrastructure, not the trial's own error)


def _final_report(record: TrialRecord) -> dict[str, Any]:
    """A trial's last report to Tune: its numbers as Tune's metrics (what a scheduler and Tune's tables
    read), and the whole record as one JSON document under ``record``, which the driver reads back."""
    final = {k: v for k, v in record.flat().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update(status=record.status, record=record.to_json())
    return final


def _trainable(config: dict[str, Any]) -> None:
    """The Tune function trainable: one harness trial (:func:`_run_trial`) on the process's trial thread
    (``harness.process_cache.on_trial_thread``: every trial a reused process runs shares one thread)."""
    on_trial_thread(_run_trial, config)


def _run_trial(config: dict[str, Any]) -> None:
    """One harness trial, progress and the final record reported to Tune.

    Ray retries a trial whose process or node died (``FailureConfig(max_failures=MAX_RETRIES)``). A trial
    that failed on its own (an error, a non-finite loss) is ERROR in Ray too, but its record is kept in
    its folder, so a retry reports it again at once instead of recomputing a deterministic failure.
    """
    import torch
    from ray import tune

    # A worker imports the harness afresh: the sweep's plugin methods and tracks are registered here again
    load_plugins(config.get("plugins") or (), "the sweep's plugins (in a Ray worker)")
    spec = ResolvedTrial.from_config(config["spec"])  # the one serialisation Ray needs, undone
    marker = Path(tune.get_context().get_trial_dir()) / FAILED_RECORD
    if marker.is_file():
        failed = TrialRecord.from_json(marker.read_text())
        tune.report(_final_report(failed))
        raise TrialFailed(f"{_trial_label(spec)}: {failed.error}")
    os.environ["HARNESS_CACHE"] = config["cache_root"]
    torch.set_num_threads(max(1, int(config["cpus"])))

    def report(metrics: dict[str, Any]) -> None:
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})

    # heavy: harness.tune_trial imports torch
    from harness.tune_trial import TuneTrialPlan, remove_checkpoints, run_tune_trial

    plan = TuneTrialPlan.from_config(config)
    record = run_tune_trial(spec, report, plan)  # checkpoints, and intermediate scores under a scheduler
    final = _final_report(record)
    if plan.scheduler:  # the scheduler's last word on the trial: its full-budget score
        final[TIME_ATTR] = int(record.extra.get("updates") or 0)
        if isinstance(final.get(plan.metric), (int, float)):
            final[RUNG_KEY] = rung_value(final[plan.metric], final.get(plan.tiebreak) if plan.tiebreak else None)
    tune.report(final)
    remove_checkpoints()  # a finished trial keeps its adapter, not its training state
    if record.status != "ok":
        # Ray's own status (dashboard, ResultGrid) then says the trial failed; resume_errored=False keeps
        # --resume from rerunning it.
        atomic_write_text(marker, record.to_json())
        raise TrialFailed(f"{_trial_label(spec)}: {record.error}")


def _no_retry_callback():
    """A Tune callback that stops Ray from retrying a trial whose final record says it failed on its own
    (an error or a non-finite loss, reported just before it raises): retrying a deterministic failure
    recomputes nothing new and prints the same error again. Retries stay for a dead process or node,
    which reports no record."""
    from ray.tune import Callback

    class _NoRetryOfOwnFailures(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("status") == "failed" and "record" in result:
                trial.max_failures = 0

    return _NoRetryOfOwnFailures()


def _trial_name(trial) -> str:
    spec = trial.config["spec"]
    defaults = get_method(spec["method"]).default_settings()
    # the settings that differ from the method's defaults name the grid point
    settings = "-".join(f"{k}{v}" for k, v in sorted(spec["method_settings"].items()) if defaults.get(k) != v)
    name = f"{spec['task']}_{spec['method']}{('_' + settings) if settings else ''}_s{spec['seed']}"
    # it names the trial's folder: a setting's value (EigenLoRA's bank_dir) may hold a path
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)[:80]


def _trial_dir(trial) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


_AUTH_HINT = ("If the cluster uses token authentication (Ray 2.59+ turns it on for clusters it starts), the "
              "sweep's environment needs RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
              "`ray get-auth-token` reads on the head node).")


@dataclass(frozen=True)
class LocalResources:
    """What a local Ray instance may hand to trials (``sweep --cpus/--gpus``); None: all of this machine."""

    cpus: int | None = None
    gpus: int | None = None

    def check(self, address: str | None) -> None:
        """A ConfigError before any compute when the counts are impossible here."""
        if self.cpus is None and self.gpus is None:
            return
        if address:
            raise ConfigError("--cpus/--gpus size a local Ray instance; a cluster's resources are set where its "
                              "nodes start (`ray start --num-cpus N --num-gpus N`): leave them out with --address")

        if self.cpus is not None and not 1 <= self.cpus <= host_cpus():
            raise ConfigError(f"--cpus {self.cpus}: this machine lets the sweep use 1..{host_cpus()} cores")
        if self.gpus is not None:
            visible = visible_gpus()
            if not 0 <= self.gpus <= visible:
                raise ConfigError(f"--gpus {self.gpus}: {visible} GPU(s) are visible here (CUDA_VISIBLE_DEVICES "
                                  f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use 0..{visible}")


def init_ray(address: str | None, dashboard: bool, local: LocalResources = LocalResources()) -> None:
    import ray

    if ray.is_initialized():
        return
    local.check(address)
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        check_reachable(address)
        kwargs["address"] = address
    else:
        if local.cpus is not None:
            kwargs["num_cpus"] = local.cpus
        if local.gpus is not None:  # Ray gives out the first N visible GPUs
            kwargs["num_gpus"] = local.gpus
        kwargs["include_dashboard"] = dashboard
        if dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
    try:
        ctx = ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise ConfigError(f"could not connect to {where}: {type(e).__name__}: {e}. {_AUTH_HINT}") from None
    url = getattr(ctx, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}", flush=True)


def check_resources(studies: list[Study], nodes: list[dict[str, float]]) -> None:
    """Every study's trial must fit on one node of the cluster (``nodes``: each alive node's resources);
    Ray would otherwise leave the trials PENDING for ever."""
    most_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    most_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    for study in studies:
        r = study.resources
        if r.cpus_per_trial > most_cpu:
            raise ConfigError(f"study {study.name!r}: resources.cpus_per_trial={r.cpus_per_trial} but the largest "
                              f"node of the cluster has {most_cpu:g} CPUs; a trial could never start. Use at most "
                              f"{most_cpu:g}")
        if r.gpus_per_trial != "auto" and float(r.gpus_per_trial) > most_gpu:
            raise ConfigError(f"study {study.name!r}: resources.gpus_per_trial={r.gpus_per_trial} but the largest "
                              f"node of the cluster has {most_gpu:g} GPUs; use at most {most_gpu:g} (0: CPU only)")
        device = str(study.settings.get("device", "auto"))
        holds_gpu = most_gpu > 0 if r.gpus_per_trial == "auto" else float(r.gpus_per_trial) > 0
        if device.startswith("cuda:"):
            raise ConfigError(f"study {study.name!r}: settings.device={device!r}, but under a sweep Ray places each "
                              "trial on a GPU of its choosing (CUDA_VISIBLE_DEVICES); use device auto, cuda or cpu")
        if device == "cuda" and not holds_gpu:
            raise ConfigError(f"study {study.name!r}: settings.device='cuda', but its trials hold no GPU "
                              f"(resources.gpus_per_trial {r.gpus_per_trial}, largest node {most_gpu:g} GPUs); set "
                              "gpus_per_trial above 0 on a cluster with GPUs, or device auto or cpu")


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _gpus_per_trial(study: Study, n_trials: int) -> float:
    if study.resources.gpus_per_trial != "auto":
        return float(study.resources.gpus_per_trial)
    return auto_gpu_share(n_trials, _cluster_gpus())


def run_wave(specs: list[ResolvedTrial], study: Study, exp_dir: Path, resume: bool,
             callbacks: list[Any] | None = None, plugins: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run (or resume) one Tune experiment over ``specs``; return the flat trial records. ``callbacks``:
    Ray Tune's tracking callbacks (``harness/experiment_logging.py``) for a new experiment; ``plugins``: the sweep's
    plugin modules, imported by each trial's worker before it runs."""
    from ray import tune

    if not specs:
        return []
    from harness.tune_trial import tune_trial_plan  # heavy: harness.tune_trial imports torch

    trial_plan, scheduler = tune_trial_plan(study, specs)  # a scheduler in the selection stage only
    grid_order = specs
    if scheduler is not None:  # progress reports carry no score; the scheduler skips them
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        specs = interleave_groups(specs)  # a group's trials reach its rungs one after another
    elif route_by_structure():
        from harness.trial_routing import StructureAffinity, structure_order  # heavy: imports Ray Tune

        specs, scheduler = structure_order(specs), StructureAffinity()
    gpus = _gpus_per_trial(study, len(specs))
    trial_plan = replace(trial_plan, start_delays=start_delays(
        [spec_key(s.to_config()) for s in specs], gpus, _cluster_gpus(), study.resources.max_concurrent,
        study.resources.start_stagger_s))
    trainable = tune.with_resources(_trainable, {"cpu": study.resources.cpus_per_trial, "gpu": gpus})
    exists = (exp_dir / "tuner.pkl").exists()
    if exists and not resume:
        raise ConfigError(f"results of this sweep already exist in {exp_dir}: pass --resume to continue "
                          "(finished trials are kept), or --results DIR for a fresh folder")
    if exists and tune.Tuner.can_restore(str(exp_dir)):
        print(f"[sweep] resuming {exp_dir}", flush=True)
        from harness.tune_trial import fill_missing_checkpoints  # heavy: harness.tune_trial imports torch

        fill_missing_checkpoints(exp_dir)  # a checkpoint gone from storage: its trial starts again, not fails
        with _unreported_trials_said():
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=False)
    else:
        param_space = {"spec": tune.grid_search([s.to_config() for s in specs]), "cache_root": str(cache_root()),
                       "cpus": study.resources.cpus_per_trial, "tune_trial": trial_plan.to_config(),
                       "plugins": list(plugins)}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            # reuse_actors: a wave's next trial runs in a finished trial's process (harness/process_cache.py)
            tune_config=tune.TuneConfig(max_concurrent_trials=study.resources.max_concurrent,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dir,
                                        scheduler=scheduler,
                                        reuse_actors=reuse_actors(on_gpu=gpus > 0)),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent),
                                      failure_config=tune.FailureConfig(max_failures=MAX_RETRIES), verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[_no_retry_callback(), *(callbacks or [])]),
        )
    with _interrupt_watch() as interrupted:
        grid = tuner.fit()
        stopped = interrupted()
    unfinished = [r for r in grid if "record" not in (r.metrics or {}) and r.error is None]
    if stopped or unfinished:
        # Ray stopped the experiment on SIGINT and saved its state: finished trials are kept for --resume
        raise KeyboardInterrupt(f"{len(unfinished)} trial(s) of {exp_dir.name} did not finish")
    from harness.tune_trial import remove_wave_checkpoints  # heavy: harness.tune_trial imports torch

    remove_wave_checkpoints(exp_dir)  # those of trials a scheduler stopped before their own clean-up
    position = {spec_key(s.to_config()): i for i, s in enumerate(grid_order)}
    rows: list[tuple[int, dict[str, Any]]] = []
    for result in grid:
        metrics = result.metrics or {}
        if "record" in metrics:
            row = TrialRecord.from_json(metrics["record"]).flat()  # the worker's record, as a row
        else:  # the trial process itself died (not a Python error inside the trial)
            spec = ResolvedTrial.from_config(result.config["spec"])
            row = _unrun_record(spec, f"trial did not finish: {result.error!r}")
        rows.append((position.get(spec_key(result.config["spec"]), len(position)), row))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]  # the study's grid order, however Tune ran it


class UnreportedTrialsNote(logging.Filter):
    """Ray's warning when a sweep is restored, "Failed to fetch metrics for N trial(s): ... FileNotFoundError",
    names every trial that had reported nothing when the sweep stopped (not started yet, or cut before its
    first report). Those are not failures, and they run now; a user reading "FileNotFoundError" takes them
    for lost work. This filter, on the logger that warns, replaces such a warning with one line that says
    what it means, and lets a warning that names any other error through as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Failed to fetch metrics for "):
            return True
        trials = [line for line in message.splitlines()[1:] if line.startswith("- ")]
        if not trials or not all("FileNotFoundError(" in line for line in trials):
            return True
        print(f"[sweep] {len(trials)} trial(s) had reported no result when the sweep stopped (not started, or "
              "cut before their first report): they run now", flush=True)
        return False


@contextmanager
def _unreported_trials_said():
    """:class:`UnreportedTrialsNote` on Ray's experiment-analysis logger, while a sweep is restored."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    note = UnreportedTrialsNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


@contextmanager
def _interrupt_watch():
    """Tells whether SIGINT arrived while Ray Tune ran: Tune takes SIGINT over during ``fit`` (it stops the
    experiment, saves its state and returns normally) and gives the handler it found back on the first
    one, so a handler of ours left in place means Tune was interrupted."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # a second Ctrl-C, after Tune gave the handler back, stops at once
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: signal.getsignal(signal.SIGINT) is on_sigint
    finally:
        signal.signal(signal.SIGINT, previous)


def choose_settings(records: list[dict[str, Any]], metric: str, higher_is_better: bool = True,
                    tiebreak: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (method, task), the settings with the best mean ``metric`` over seeds among those that trained
    furthest (failed trials skipped; equal means decided by the mean ``tiebreak``; see :func:`_best_groups`),
    plus what the selection trial chose inside itself (``Method.final_settings``: GLoRA's searched subnet),
    taken from the seed that scored best under those settings."""
    chosen = {}
    for (method, task), (settings, top) in _best_groups(records, metric, higher_is_better, tiebreak).items():
        extra = top.get("extra")
        described = (json.loads(extra) if isinstance(extra, str) and extra else extra or {}).get("method", {})
        chosen[(method, task)] = (get_method(method).final_settings(json.loads(settings), described)
                                  if described else json.loads(settings))
    return chosen


def _best_groups(records: list[dict[str, Any]], metric: str, higher_is_better: bool, tiebreak: str | None = None
                 ) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """Per (method, task): (the chosen settings JSON, the record of its best seed, the lowest seed among
    equals). Settings are ranked by how far their trials trained (the fewest updates over their seeds),
    then by mean ``metric`` over seeds, then by the mean ``tiebreak`` (the benchmark's finer metric, better
    in the same direction; RL: success on 10 episodes ties often, the return rarely; a record without it
    ranks last), then by the settings JSON, so that a choice never depends on the order trials finished in.
    Training distance comes first because a trial that an early-stopping scheduler stopped reports its score
    at a rung, after fewer updates: that score does not compete with the full-budget scores of the trials
    the scheduler kept (which it judged better at that rung). Without a scheduler every trial trains the
    whole budget and the metric alone decides."""
    import pandas as pd

    ok = [r for r in records if r.get("status") == "ok" and r.get(metric) is not None]
    if not ok:
        return {}
    df = pd.DataFrame(ok)
    df["_updates"] = [record_updates(r) for r in ok]
    worst = float("-inf") if higher_is_better else float("inf")
    df["_tiebreak"] = [float(r[tiebreak]) if tiebreak and r.get(tiebreak) is not None else worst for r in ok]
    per = df.groupby(["method", "task", "settings"]).agg(score=(metric, "mean"), reach=("_updates", "min"),
                                                         tie=("_tiebreak", "mean"))
    per = per.reset_index().sort_values(["method", "task", "reach", "score", "tie", "settings"],
                                        ascending=[True, True, False, not higher_is_better, not higher_is_better,
                                                   True], kind="stable")
    best = per.drop_duplicates(["method", "task"])
    out = {}
    for r in best.itertuples():
        group = [x for x in ok if (x["method"], x["task"], x["settings"]) == (r.method, r.task, r.settings)]
        group.sort(key=lambda x: ((-1 if higher_is_better else 1) * x[metric], x.get("seed", 0)))
        out[(r.method, r.task)] = (r.settings, group[0])
    return out


def lora_bank(records: list[dict[str, Any]], task: str, methods: tuple[str, ...], metric: str,
              higher_is_better: bool = True) -> list[str]:
    """EigenLoRA's bank in a sweep: for every task but ``task``, one saved adapter of ``methods`` (LoRA)
    from ``records`` (one stage of the study): the settings chosen for that task as :func:`choose_settings`
    chooses them (the final stage of select-then-final has only one), and of those the lowest seed."""
    ok = [r for r in records if r.get("status") == "ok" and base_name(r["method"]) in methods
          and r["task"] != task and r.get("adapter_path")]
    bank = {}
    for (_, other), (settings, _) in sorted(_best_groups(ok, metric, higher_is_better).items()):
        if other in bank:  # one adapter per task, even when several variants of the method ran
            continue
        runs = sorted((r for r in ok if r["task"] == other and r["settings"] == settings), key=lambda r: r["seed"])
        bank[other] = runs[0]["adapter_path"]
    return [bank[t] for t in sorted(bank)]


def run_study(sweep: SweepFile, study: Study, results_dir: Path, resume: bool, selection_only: bool = False
              ) -> list[dict[str, Any]]:
    """Prepare the track's artifacts once, then run the study's waves; return all final-stage records.
    With ``selection_only`` a select-then-final study stops after its selection stage and returns that
    stage's records (written as ``*-select-records.jsonl``); the same sweep with ``resume`` later keeps those
    trials and trains the final stage."""
    track = get_track(study.track)
    benchmark = track.benchmark(study.benchmark)
    print(f"[sweep] {sweep.name}/{study.name}: preparing {study.track} artifacts (cached after the first run)",
          flush=True)
    track.prepare(track_settings(study), study.benchmark, study_tasks(study), print_reporter)
    base = results_dir / sweep.name
    waves = method_waves(list(study.methods))
    metric, higher = benchmark.primary_metric, benchmark.higher_is_better
    selecting = selection_methods(study)

    def run_stage(stage: str, chosen=None, methods=None, skip=()) -> list[dict[str, Any]]:
        specs = [s for s in study_trials(study, stage, chosen)
                 if (methods is None or s.method in methods) and (s.method, s.task) not in skip]
        recs: list[dict[str, Any]] = []
        for i, names in enumerate(waves):
            folder = base / (f"{study.name}-{stage}" + (f"-wave{i}" if i else ""))
            wave, unbanked = _with_banks([s for s in specs if s.method in names], recs, metric, higher)
            recs += run_wave(wave, study, folder, resume,
                             experiment_logging.callbacks(sweep.tracking, results_dir, sweep.name, study.name),
                             sweep.plugins) + unbanked
        return recs

    if study.protocol == "select-then-final":
        selection = run_stage("select", methods=selecting) if selecting else []
        selection = label_records(selection, study, selecting)
        _write_records(base / f"{study.name}-select-records.jsonl", selection)
        if selection_only:
            return selection
        chosen = choose_settings(selection, metric, higher, benchmark.tiebreak_metric)
        skip: list[tuple[str, str]] = []
        for m in study.methods:
            for t in study_tasks(study):
                if (m, t) in chosen:
                    continue
                first = resolved_grid(study, m)[0]
                if m not in selecting:  # a grid of one point: nothing to choose
                    chosen[(m, t)] = first
                elif get_method(m).needs_selection(first):
                    # what the selection trial should have chosen (GLoRA's subnet) cannot be chosen again
                    # in the final stage, whose validation data is training data: no final run
                    print(f"[sweep] no successful selection trial for {(m, t)}: no final run", flush=True)
                    chosen[(m, t)] = first
                    skip.append((m, t))
                else:  # every selection trial failed: fall back to the first grid point, and say so
                    print(f"[sweep] no successful selection trial for {(m, t)}; final runs use the first grid "
                          "point", flush=True)
                    chosen[(m, t)] = first
        records = run_stage("final", chosen, skip=skip)
        records += [_unrun_record(s, "no successful selection trial: the final stage reuses what selection chose "
                                     "inside the trial (GLoRA's subnet) and has nothing to reuse")
                    for s in study_trials(study, "final", chosen) if (s.method, s.task) in skip]
    else:
        records = run_stage("final")
    records = label_records(records, study, selecting)
    _write_records(base / f"{study.name}-records.jsonl", records)
    return records


def label_records(records: list[dict[str, Any]], study: Study, selecting: list[str]) -> list[dict[str, Any]]:
    """Each record with how its row's settings are chosen (``selection``) and from how many grid points
    (``grid_size``); see ``TrialRecord``."""
    for r in records:
        size = grid_size(study.methods[r["method"]], r["method"])
        if r["method"] in selecting:
            how = "held-out"
            if study.selection.scheduler:  # chosen among early-stopped trials: another entry than the full grid

                how += "/" + parse_scheduler(study.selection.scheduler_settings()).label()
        elif size == 1:
            how = "single-point"
        else:
            how = "on-reported"
        r.update(selection=how, grid_size=size)
    return records


def _unrun_record(spec: ResolvedTrial, why: str) -> dict[str, Any]:
    record = spec.record()
    record.status, record.error = "failed", why
    return record.flat()


def _with_banks(specs: list[ResolvedTrial], earlier: list[dict[str, Any]], metric: str, higher: bool
                ) -> tuple[list[ResolvedTrial], list[dict[str, Any]]]:
    """The specs of methods that build on others' adapters (EigenLoRA), each with its bank picked from
    ``earlier`` (this stage's records) by :func:`lora_bank`; a spec with ``bank_dir`` keeps its folder.
    A spec whose bank would be empty is not run: its failed record says why."""
    out, unrun = [], []
    for s in specs:
        deps = get_method(s.method).builds_on
        if not deps or s.method_settings.get("bank_dir"):
            out.append(s)
            continue
        bank = lora_bank(earlier, s.task, deps, metric, higher)
        if bank:
            out.append(replace(s, adapter_bank=tuple(bank)))
        else:
            unrun.append(_unrun_record(s, f"no successful {'/'.join(deps)} trial on another task of this study "
                                          "and stage: EigenLoRA's bank would be empty (run more tasks, or set "
                                          "bank_dir to a folder of LoRA adapters)"))
    return out, unrun


def check_inputs(sweep: SweepFile) -> None:
    """Before Ray starts and before anything is written: every study's files on disk (data roots and their
    layout, weights, a pretrained base) as its track checks them (``Track.check_inputs``)."""
    for study in sweep.studies:
        track = get_track(study.track)
        try:
            track.check_inputs(track_settings(study), study.benchmark, study_tasks(study))
        except HarnessError as e:
            raise ConfigError(f"study {study.name!r}: {e}") from None


def check_banks(sweep: SweepFile) -> None:
    """Before any compute: a method that builds on other methods' adapters (EigenLoRA) needs them in its
    own study, or a named folder (``bank_dir``); its bank is never whatever the cache happens to hold."""
    for study in sweep.studies:
        for m in study.methods:
            deps = get_method(m).builds_on
            if not deps or any(base_name(d) in deps for d in study.methods):
                continue
            if any(not g.get("bank_dir") for g in resolved_grid(study, m)):
                raise ConfigError(f"study {study.name!r}: method {m!r} builds its bank from the study's own "
                                  f"{' / '.join(deps)} trials, and the study has none; add "
                                  f"{' or '.join(repr(d) for d in deps)} to its methods, or set bank_dir to a "
                                  "folder of LoRA adapters")


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str, sort_keys=True) + "\n" for r in records))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:  # an empty mapping is a value of its own (a method with no settings)
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def check_results(sweep: SweepFile, results_dir: Path, resume: bool) -> None:
    """Before any compute: a study whose results exist needs ``--resume``, and a resumed study must be
    the one that made them. Each study's validated definition is kept beside its results; a resume of an
    edited study is refused with the keys that changed (a finished grid would otherwise pass for the new one).
    Its ``resources`` may change (printed), and keys that newer code added with their defaults are no edit."""
    base = results_dir / sweep.name
    for study in sweep.studies:
        saved = base / f"{study.name}.study.json"
        current = study.model_dump(mode="json")
        if not _started(base, study):  # nothing ran (a start that failed before its first wave): no results
            continue
        if not resume:
            raise ConfigError(f"results of study {study.name!r} already exist in {base}: pass --resume to continue "
                              "(finished trials are kept), or --results DIR for a fresh folder")
        if saved.exists():
            old = _flatten(_as_current(json.loads(saved.read_text()), study))
            new = _flatten(current)
            keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            describe = lambda k: f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"  # noqa: E731
            # where and how fast trials run is not what they compute: a resume on another machine may
            # change them (say, more cores per trial); the trials keep their settings, budget and seeds
            moved = [k for k in keys if k.startswith(f"{RESOURCES_KEY}.")]
            if moved:  # Ray Tune restores a queued trial with the resources it was queued with
                print(f"[sweep] --resume of study {study.name!r} with other resources: "
                      + "; ".join(map(describe, moved)) + ". Trials of a wave that had begun keep the "
                      "resources they were queued with; waves and stages not begun yet take the new ones", flush=True)
            changed = [describe(k) for k in keys if k not in moved]
            if changed:
                raise ConfigError(f"--resume: study {study.name!r} is not the one whose results are in {base}; "
                                  f"changed: {'; '.join(changed[:8])}. Undo the edit to resume, or run the edited "
                                  "study into a fresh --results folder")


RESOURCES_KEY = "resources"


def _as_current(saved: dict[str, Any], study: Study) -> dict[str, Any]:
    """A study definition saved by older code, read by today's model: a key added since (with its default)
    is not an edit. A definition today's model refuses is compared as it was saved."""
    try:
        return type(study).model_validate(saved).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - any refusal means the same: compare what was saved
        return saved


def _started(base: Path, study: Study) -> bool:
    """Whether a wave of the study has begun (Tune wrote its experiment state): only then are there results
    to keep. A definition saved by a start that failed before (Ray refusing to start, say) is no result."""
    return any(base.glob(f"{study.name}-*/tuner.pkl"))


def record_studies(sweep: SweepFile, results_dir: Path) -> None:
    """Keep each study's validated definition beside its results (what ``check_results`` compares)."""
    for study in sweep.studies:
        saved = results_dir / sweep.name / f"{study.name}.study.json"
        if not _started(results_dir / sweep.name, study):  # a failed start's definition gives way to this one
            atomic_write_text(saved, json.dumps(study.model_dump(mode="json"), indent=1, sort_keys=True))


def run_sweep(sweep: SweepFile, results_dir: Path, leaderboard_dir: Path, resume: bool = False,
              address: str | None = None, dashboard: bool = True,
              local: LocalResources = LocalResources(), selection_only: bool = False
              ) -> dict[str, list[dict[str, Any]]]:
    """Run every study of a sweep through Ray Tune and update the leaderboard after each study. With
    ``selection_only``, only the selection stages of its select-then-final studies run (their records are
    returned; no board changes); the other studies are refused before any compute."""
    from harness import leaderboard  # heavy: harness.leaderboard imports pandas

    # Ray Tune resolves a relative path against its own storage root, not the working folder
    results_dir = Path(results_dir).resolve()
    if selection_only:
        others = [st.name for st in sweep.studies if st.protocol != "select-then-final"]
        if others:
            raise ConfigError(f"--selection-only: studies {', '.join(others)} have no selection stage (protocol "
                              "is not select-then-final); leave them out with --only STUDY, or drop the flag")
    check_results(sweep, results_dir, resume)
    check_banks(sweep)
    check_inputs(sweep)
    experiment_logging.check_installed(sweep.tracking)

    reuse_actors()  # a bad HARNESS_REUSE_ACTORS is refused before Ray starts
    # and a bad HARNESS_SHARE_COMPILED or HARNESS_SHARE_GRAPHS (read where the trials run: a local Ray's workers
    # inherit them)
    share_compiled()
    share_graphs()
    route_by_structure()  # and a bad HARNESS_TRIAL_AFFINITY
    init_ray(address, dashboard, local)
    check_resources(sweep.studies, _node_resources())

    check_shared_cache(cache_root())
    record_studies(sweep, results_dir)
    out: dict[str, list[dict[str, Any]]] = {}
    for study in sweep.studies:
        records = run_study(sweep, study, results_dir, resume, selection_only)
        out[study.name] = records
        if selection_only:  # a board holds final-stage rows only
            benchmark = get_track(study.track).benchmark(study.benchmark)
            chosen = choose_settings(records, benchmark.primary_metric, benchmark.higher_is_better,
                                     benchmark.tiebreak_metric)
            print(f"[sweep] {study.name}: selection finished ({len(records)} trials); chosen per (method, task):",
                  flush=True)
            for (method, task), settings in sorted(chosen.items()):
                print(f"[sweep]   {method} {task}: {json.dumps(settings, sort_keys=True)}", flush=True)
            continue
        paths = leaderboard.update(records, study, Path(leaderboard_dir))
        failed = [r for r in records if r.get("status") != "ok"]
        print(f"[sweep] {study.name}: {len(records) - len(failed)} trials ok, {len(failed)} failed; "
              f"leaderboard: {', '.join(str(p) for p in paths)}", flush=True)
        for r in failed:
            print(f"[sweep]   failed {r['task']} {r['method']} seed {r['seed']}: {r.get('error', '')}", flush=True)
    return out

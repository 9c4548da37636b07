"""One trial inside Ray Tune: checkpoints through Tune's API and intermediate scores for a scheduler.

The driver's trainable (``harness/driver.py``) runs a trial here instead of :func:`harness.finetune.run_trial`
(which trials outside Ray still use, unchanged). Two things are added:

- **Checkpoints.** Every ``checkpoint_every`` updates, or every ``checkpoint_minutes`` of the trial's
  wall time, the run's whole training state (:meth:`FineTuneRun.trial_state`) goes to Tune with
  ``tune.report(..., checkpoint=Checkpoint.from_directory(...))``. A retried trial (``FailureConfig``)
  or a resumed experiment finds it with ``tune.get_checkpoint()``, rebuilds the run as it was started
  and continues from that update; with deterministic kernels its record equals an uninterrupted one's
  (times and memory apart). Tune keeps the latest checkpoint only (``CheckpointConfig(num_to_keep=1)``)
  and a finished trial removes it: what stays is its adapter.
- **A process shared with earlier trials** (Tune's actor reuse, ``harness/process_cache.py``): what an
  earlier trial of the process left is cleared first, and the record says how many ran before it
  (``extra.process_trials_before``).
- **Intermediate scores** (selection under a scheduler, ``harness/early_stopping.py``): at the updates
  the scheduler decides on, the model is scored on the stage's held-out split or episodes and reported
  with :data:`~harness.early_stopping.TIME_ATTR` and a provisional record, so that a trial the scheduler
  stops leaves a record with its last score.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import placement
from harness.cache import cache_root
from harness.early_stopping import (RUNG_KEY, TIME_ATTR, eval_points, grouped_scheduler, parse_scheduler,
                                    rung_value)
from harness.errors import ConfigError
from harness.finetune import FineTuneRun
from harness.plan import trial_cost
from harness.process_cache import begin_trial, end_trial, use_shared_compile_cache
from harness.tracks import get_track
from harness.trial import Reporter, ResolvedTrial, TrialRecord, spec_key

STATE_FILE = "trial-state.pt"
# Left by the driver in a checkpoint folder that the experiment's state names but storage no longer has
# (results moved without their checkpoints, storage that lost them): Ray restores the trial from it, and
# the trial starts again from update 0 (:func:`fill_missing_checkpoints`).
MISSING_MARKER = "MISSING-CHECKPOINT.txt"
# Tests only: the trial's process exits right after its first checkpoint on its first attempt, as a
# preempted node would leave it (tests/test_trial_checkpoint.py): every trial's with "1", else the trials
# named as by PAUSE_TRIAL below.
KILL_AFTER_CHECKPOINT = "HARNESS_TEST_EXIT_AFTER_CHECKPOINT"
# Tests only: a trial whose folder path in the results (its Tune trial name included) contains one of this
# variable's comma-separated values waits, on its first attempt, after its first checkpoint
# (``checkpoint_every`` set) or else after its first update, having left PAUSED_MARKER in its trial folder:
# a test then interrupts or kills the sweep with that trial mid-way and the others finished, whatever the
# machine's speed (tests/conftest.py, tests/test_bench_scale.py).
PAUSE_TRIAL = "HARNESS_TEST_PAUSE_TRIAL"
PAUSED_MARKER = "PAUSED-BY-TEST"


@dataclass(frozen=True)
class TuneTrialPlan:
    """How a trial runs under Tune: its checkpoint cadence and, under a scheduler, its scoring points."""

    checkpoint_every: int | None = None  # updates; None: by wall time
    checkpoint_minutes: float = 5.0  # 0 with checkpoint_every None: no checkpoints
    eval_points: tuple[int, ...] = ()  # updates after which to report an intermediate score
    metric: str = ""  # the benchmark's primary metric, kept in the provisional record
    tiebreak: str = ""  # the benchmark's tiebreak metric, folded into what the scheduler reads (RUNG_KEY)
    scheduler: str = ""  # the scheduler's label, kept in the record
    # a checkpoint with every rung's score: synchronous halving pauses the trial there and resumes it from it
    rung_checkpoints: bool = False
    # seconds to wait before the trial, by harness.trial.spec_key, for a wave's first trials that share a GPU
    # (harness.placement.start_delays); a trial in a process that ran one before does not wait
    start_delays: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TuneTrialPlan":
        raw = config.get("tune_trial") or {}
        return cls(checkpoint_every=raw.get("checkpoint_every"), checkpoint_minutes=raw.get("checkpoint_minutes", 5.0),
                   eval_points=tuple(raw.get("eval_points", ())), metric=raw.get("metric", ""),
                   tiebreak=raw.get("tiebreak", ""), scheduler=raw.get("scheduler", ""),
                   rung_checkpoints=bool(raw.get("rung_checkpoints", False)),
                   start_delays={str(k): float(v) for k, v in (raw.get("start_delays") or {}).items()})

    def to_config(self) -> dict[str, Any]:
        return {"checkpoint_every": self.checkpoint_every, "checkpoint_minutes": self.checkpoint_minutes,
                "eval_points": list(self.eval_points), "metric": self.metric, "tiebreak": self.tiebreak,
                "scheduler": self.scheduler, "rung_checkpoints": self.rung_checkpoints,
                "start_delays": dict(self.start_delays)}


def _save(run: FineTuneRun, extra: dict[str, Any], report_metrics: dict[str, Any]) -> None:
    import torch
    from ray import tune

    run.mark_training()
    folder = tempfile.mkdtemp(prefix="harness-ckpt-")
    try:
        torch.save({"run": run.trial_state(), **extra}, Path(folder) / STATE_FILE)
        tune.report(report_metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    finally:  # Tune has copied it to the trial's storage by now
        shutil.rmtree(folder, ignore_errors=True)
    run.clock.mark("checkpoint")


def _restore(run: FineTuneRun) -> tuple[dict[str, Any] | None, str | None]:
    """The latest checkpoint of this trial, loaded into the freshly started run, and the name of a
    checkpoint that Tune restored the trial from but that holds no training state (None, None: no
    checkpoint yet). A checkpoint without the state file (gone from storage, see
    :func:`fill_missing_checkpoints`) counts as none: the trial starts again from update 0."""
    import torch
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None or run.trainer is None:
        return None, None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            if not (Path(folder) / MISSING_MARKER).is_file():  # the driver warned of the marked ones already
                print(f"[trial] warning: checkpoint {checkpoint.path} holds no {STATE_FILE}; "
                      "starting again from update 0", flush=True)
            return None, Path(checkpoint.path).name
        state = torch.load(path, map_location="cpu", weights_only=False)
    run.load_trial_state(state["run"])
    run.clock.mark("checkpoint")  # reading it and redrawing the batches already trained on
    print(f"[trial] continuing from the checkpoint at update {run.updates_done}", flush=True)
    return state, None


def fill_missing_checkpoints(exp_dir: Path) -> list[str]:
    """Before ``Tuner.restore``: the checkpoints that the experiment's saved state names for its unfinished
    trials but that are not in ``exp_dir`` are made again as folders holding only :data:`MISSING_MARKER`,
    and each is named in a printed warning; return their paths relative to ``exp_dir``.

    Ray refuses to restore a trial whose checkpoint is gone (``ValueError: Could not recover from
    checkpoint as it does not exist on storage anymore``) and the trial fails; with the marker it is
    restored, finds no training state (:func:`_restore`) and trains again from update 0, its record saying
    so (``extra.checkpoint_missing``). Only a local ``exp_dir`` is looked at."""
    # Tune's own readers of its experiment state (private in Ray 2.60, which pyproject pins exactly): the
    # state's trials are pickled, and their checkpoint paths are what Tune rebases on restore
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.experiment.trial import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    newest = _find_newest_experiment_checkpoint(str(exp_dir))
    if newest is None:
        return []
    state = _loads_with_cloudpickle(Path(newest).read_text())
    made = []
    for trial_json, run_metadata in state.get("trial_data", []):
        trial = Trial.from_json_state(trial_json, stub=True)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # not run again on resume; they keep no checkpoint
            continue
        trial.restore_run_metadata(run_metadata)
        latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
        if latest is None:
            continue
        # the folder as the moved experiment has it: <trial folder>/<checkpoint folder>, as Tune rebases it
        rel = Path(*Path(latest.checkpoint.path).parts[-2:])
        folder = exp_dir / rel
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        (folder / MISSING_MARKER).write_text(
            f"{rel} was named by the experiment's state but missing when it was resumed; the trial "
            "started again from update 0.\n")
        print(f"[sweep] warning: trial {trial.custom_trial_name or trial.trial_id}: its checkpoint {rel} is "
              "missing from the results; the trial starts again from update 0", flush=True)
        made.append(str(rel))
    return made


def provisional_record(run: FineTuneRun, metric: str, score: float, update: int, label: str,
                       trials_before: int = 0) -> TrialRecord:
    """The record a trial stopped now would leave: its score so far, where it stopped, and its cost so far
    (updates, ms per steady update, wall time, and where that time went: ``timing`` with its training span
    closed now, the placement, ``process_trials_before``), so a stopped trial's GPU time is counted too."""
    now = time.time()
    wall = round(now - run.started, 2)
    timing = run.timing()
    if "training_span" not in timing and run.clock.training_span:  # training goes on until the scheduler stops it
        timing["training_span"] = [round(run.clock.training_span[0], 3), round(now, 3)]
    extra = {"stopped_at_update": update, "updates": update, "total_wall_s": wall, "selection_scheduler": label,
             "timing": timing, "started_at": round(run.started, 3), "process_trials_before": trials_before}
    if run.setup is not None:
        extra["placement"] = placement.describe(str(run.setup.device))
    rec: TrialRecord = replace(run.record, metrics={metric: score}, extra=extra)
    rec.wall_time_s = wall
    if run.trainer is not None:
        rec.ms_per_update = round(run.trainer.steady_ms_per_update(), 3)
    return rec


def remove_checkpoints() -> None:
    """A finished trial's checkpoints: only its adapter is kept."""
    from ray import tune

    try:
        trial_path = Path(tune.get_context().get_storage().trial_fs_path)
    except Exception:  # noqa: BLE001 - a remote (non-local) storage keeps them; Tune prunes to one
        return
    for folder in trial_path.glob("checkpoint_*"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_wave_checkpoints(exp_dir: Path) -> int:
    """After a wave's experiment has ended with every trial finished: remove the checkpoints its trials
    left in ``exp_dir``; return how many. A trial removes its own as it finishes (:func:`remove_checkpoints`)
    unless Tune stopped it first, which a scheduler does: at a rung (early stopping) and also on the final
    report that reaches ``max_t``, before the trial's own clean-up runs."""
    gone = 0
    for folder in exp_dir.glob("*/checkpoint_*"):
        shutil.rmtree(folder, ignore_errors=True)
        gone += 1
    return gone


def _named_by_test(variable: str) -> bool:
    """Whether a test hook (:data:`PAUSE_TRIAL`, :data:`KILL_AFTER_CHECKPOINT`) names this trial: "1" names
    every trial, else comma-separated parts of the trial's folder path in the results (its name included)."""
    from ray import tune

    value = os.environ.get(variable, "")
    if value == "1":
        return True
    context = tune.get_context()
    try:
        where = f"{context.get_storage().trial_fs_path}/{context.get_trial_name()}"
    except Exception:  # noqa: BLE001 - a storage without a local path: the trial's name alone
        where = context.get_trial_name()
    return any(part and part in where for part in value.split(","))


def run_tune_trial(spec: ResolvedTrial, report: Reporter, plan: TuneTrialPlan) -> TrialRecord:
    """Run one trial under Tune (inside its function trainable) to its record; see the module doc."""
    # under actor reuse the process may have run trials before this one: what they left is cleared
    trials_before = begin_trial()
    delay = 0.0 if trials_before else plan.start_delays.get(spec_key(spec.to_config()), 0.0)
    if delay:  # out of step with the trials beside it on the GPU; before the trial's clock starts
        time.sleep(delay)
    use_shared_compile_cache(cache_root())
    run = FineTuneRun(spec, report, waited_s=delay)
    ok = True  # a scheduler's stop (SystemExit from tune.report) leaves the compiled graphs whole
    try:
        record = _run_tune_trial(run, spec, plan, trials_before)
        ok = record.status != "failed"
        return record
    except Exception:
        ok = False
        raise
    finally:  # a trial the scheduler stops never reaches finish(): its rollout workers go here
        end_trial(ok)
        run.close()


def _run_tune_trial(run: FineTuneRun, spec: ResolvedTrial, plan: TuneTrialPlan, trials_before: int) -> TrialRecord:
    from ray import tune

    run.start()
    state, missing = _restore(run)
    resumed_from = run.updates_done if state is not None else 0
    last: dict[str, Any] = dict(state.get("last", {})) if state else {}  # the last intermediate report
    points = set(plan.eval_points)
    saved_at, since = resumed_from, time.monotonic()
    first_attempt = state is None and missing is None
    pause = first_attempt and _named_by_test(PAUSE_TRIAL)
    kill = first_attempt and _named_by_test(KILL_AFTER_CHECKPOINT)
    while run.step():
        done = run.updates_done
        metrics: dict[str, Any] = {}
        if done in points:
            try:
                interim = run.interim_metrics()
                score = interim[plan.metric]
            except Exception as e:  # noqa: BLE001 - a failed evaluation fails the trial, not the sweep
                run._fail(e)
                break
            provisional = provisional_record(run, plan.metric, score, done, plan.scheduler, trials_before)
            rank = rung_value(score, interim.get(plan.tiebreak) if plan.tiebreak else None)
            last = {plan.metric: score, RUNG_KEY: rank, TIME_ATTR: done, "record": provisional.to_json()}
            metrics = {"update": done, **last}
        due = (plan.checkpoint_every and done - saved_at >= plan.checkpoint_every) or (
            not plan.checkpoint_every and plan.checkpoint_minutes > 0
            and time.monotonic() - since >= 60 * plan.checkpoint_minutes) or (
            bool(metrics) and plan.rung_checkpoints)
        if due and not run.trainer.done:
            _save(run, {"last": last}, metrics or {"update": done})
            saved_at, since = done, time.monotonic()
            if kill:
                os._exit(1)
        elif metrics:
            tune.report(metrics)
        if pause and (saved_at > resumed_from or not plan.checkpoint_every):
            # in the trial's folder of the results (storage), where the test looks
            folder = Path(tune.get_context().get_storage().trial_fs_path)
            (folder / PAUSED_MARKER).write_text(f"paused after update {done}\n")
            time.sleep(600)  # until the test's signal stops the sweep
            pause = False
    record = run.finish()
    # the process's earlier trials: its start-up (extra.timing.process_to_trial_s) was theirs, not this one's
    record.extra["process_trials_before"] = trials_before
    if resumed_from:
        record.extra["resumed_from_update"] = resumed_from
    if missing:  # restored from a checkpoint without its training state: trained again from update 0
        record.extra["checkpoint_missing"] = missing
    if plan.scheduler:
        record.extra["selection_scheduler"] = plan.scheduler
    return record




def tune_trial_plan(study, specs: list[ResolvedTrial]) -> tuple[TuneTrialPlan, Any]:
    """The plan of a wave's trials and the Tune scheduler of the wave (None but in the selection stage of
    a study with ``selection.scheduler``). Raises ConfigError before any compute when the selection
    budget's updates cannot be known (a scheduler needs them as ``max_t``)."""
    r = study.resources
    base = TuneTrialPlan(checkpoint_every=r.checkpoint_every, checkpoint_minutes=r.checkpoint_minutes)
    sched = parse_scheduler(study.selection.scheduler_settings(), f"study {study.name!r}: selection")
    if sched is None or not specs or specs[0].budget.stage != "select":
        return base, None
    max_t = trial_cost(specs[0], study, None).updates
    if not max_t:
        raise ConfigError(f"study {study.name!r}: selection.scheduler needs the selection trials' updates (max_t), "
                          f"which {study.benchmark} knows only once its data is loaded; set selection.budget.steps")
    benchmark = get_track(study.track).benchmark(study.benchmark)
    mode = "max" if benchmark.higher_is_better else "min"
    plan = replace(base, eval_points=tuple(eval_points(sched, max_t)), metric=benchmark.primary_metric,
                   tiebreak=benchmark.tiebreak_metric or "", scheduler=sched.label(),
                   rung_checkpoints=sched.name == "sha")
    return plan, grouped_scheduler(sched, RUNG_KEY, mode, max_t)


__all__ = ["KILL_AFTER_CHECKPOINT", "MISSING_MARKER", "PAUSED_MARKER", "PAUSE_TRIAL", "TuneTrialPlan", "fill_missing_checkpoints", "provisional_record",
           "remove_wave_checkpoints", "run_tune_trial", "tune_trial_plan"]

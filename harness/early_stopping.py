"""Early stopping in the selection stage through Ray Tune's schedulers (ASHA, median stopping, synchronous
successive halving).

A study's ``selection: {scheduler: asha, grace_period: 2000, reduction_factor: 3}`` runs its selection
grid under Tune's ``ASHAScheduler`` (or ``MedianStoppingRule`` with ``scheduler: median``); the keys
besides ``scheduler`` are Tune's own constructor arguments. ``scheduler: sha`` (same two keys as ASHA's
rungs) is synchronous successive halving, a Tune ``TrialScheduler`` of ours (:class:`SyncHalving`): a
trial that reaches a rung is paused (its checkpoint reported with the score) until every live trial of
its group has reached that rung; then the best ``ceil(n / reduction_factor)`` resume from their
checkpoints and the rest stop. Every point is then compared with every other at each rung, as the full
grid would compare them, and the updates spent are the textbook share whatever order trials arrive in,
where asynchronous ASHA lets the first arrivals at a rung go on (measured: BENCHMARKS.md, issue 20). The
harness sets ``metric``/``mode`` (the benchmark's primary metric, on the selection split or episodes),
``time_attr`` (:data:`TIME_ATTR`, updates) and ``max_t`` (the selection budget's updates), so those keys
are refused.

Settings are chosen per (method, task): a score on one task says nothing about a trial on another, so
each (method, task) group of trials gets a scheduler of its own (:class:`GroupedScheduler`); within a
group the grid points (and selection seeds) compete. A trial reports its intermediate score at the
updates :func:`eval_points` gives (ASHA's rungs; every ``grace_period`` updates for median stopping),
each with a provisional record, so a stopped trial counts as a finished selection trial with its last
score. The final stage never uses a scheduler.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, TypeVar

from harness.errors import ConfigError

_T = TypeVar("_T")

# Reported only with intermediate and final scores: progress reports (loss) carry no time_attr, so a
# scheduler never reads a stale score from them.
TIME_ATTR = "selection_update"
# What the scheduler ranks trials by at a rung: the primary metric, its ties broken by the benchmark's
# ``tiebreak_metric`` (:func:`rung_value`); without one, the primary metric itself.
RUNG_KEY = "rung_score"
_TIEBREAK_WEIGHT = 1e-6  # below any step of a primary metric averaged over up to 10,000 episodes or images
SCHEDULERS = ("asha", "sha", "median")
_HARNESS_SET = ("metric", "mode", "time_attr", "max_t")
_ALLOWED = {
    "asha": ("grace_period", "reduction_factor", "brackets", "stop_last_trials"),
    "sha": ("grace_period", "reduction_factor"),
    "median": ("grace_period", "min_samples_required", "min_time_slice", "hard_stop"),
}


@dataclass(frozen=True)
class SchedulerPlan:
    """A validated scheduler setting of one study's selection stage."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def grace(self, max_t: int) -> int:
        """Updates before the first intermediate score (at least 1, at most ``max_t``)."""
        default = max(1, max_t // 16) if self.name in ("asha", "sha") else max(1, max_t // 8)
        return max(1, min(max_t, int(self.params.get("grace_period", default))))

    def label(self) -> str:
        """How rows name it, e.g. ``asha(grace_period=2000,reduction_factor=3)``."""
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({inner})"


def parse_scheduler(raw: dict[str, Any] | None, where: str = "selection") -> SchedulerPlan | None:
    """The study's ``selection.scheduler`` and its Tune parameters, checked; None without a scheduler."""
    if not raw or raw.get("scheduler") in (None, "none", "grid"):
        extra = sorted(k for k in (raw or {}) if k != "scheduler")
        if extra:
            raise ConfigError(f"{where}: {', '.join(extra)} given without a scheduler; set "
                              f"{where}.scheduler to one of {', '.join(SCHEDULERS)}")
        return None
    name = raw["scheduler"]
    if name == "hyperband":
        raise ConfigError(f"{where}.scheduler: 'hyperband' (Tune's HyperBandScheduler lays out its brackets "
                          "from max_t alone, not from a grace period): use 'sha' for synchronous successive "
                          "halving, or 'asha' with brackets: N, Tune's asynchronous HyperBand")
    if name not in SCHEDULERS:
        raise ConfigError(f"{where}.scheduler: {name!r} is not a scheduler; valid: {', '.join(SCHEDULERS)}")
    params = {k: v for k, v in raw.items() if k != "scheduler"}
    for k, v in params.items():
        if k in _HARNESS_SET:
            raise ConfigError(f"{where}.{k}: set by the harness (metric: the benchmark's primary metric on the "
                              f"selection split, mode from it, time_attr: updates, max_t: the selection budget's "
                              f"updates); remove it")
        if k not in _ALLOWED[name]:
            raise ConfigError(f"{where}.{k}: not a parameter of Tune's {name} scheduler here; valid: "
                              f"{', '.join(_ALLOWED[name])}")
        if k in ("stop_last_trials", "hard_stop"):
            if not isinstance(v, bool):
                raise ConfigError(f"{where}.{k}: {v!r} is not true or false")
        elif k == "reduction_factor":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 1:
                raise ConfigError(f"{where}.reduction_factor: {v!r}; use a number above 1 (e.g. 3 or 4)")
        elif isinstance(v, bool) or not isinstance(v, int) or v < (1 if k != "min_time_slice" else 0):
            raise ConfigError(f"{where}.{k}: {v!r}; use a whole number of at least "
                              f"{1 if k != 'min_time_slice' else 0}")
    return SchedulerPlan(name, params)


def eval_points(plan: SchedulerPlan, max_t: int) -> list[int]:
    """The updates (below ``max_t``) after which a selection trial reports an intermediate score:
    ASHA's rung milestones of every bracket, or every ``grace_period`` updates for median stopping."""
    g = plan.grace(max_t)
    if plan.name == "median":
        return list(range(g, max_t, g))
    eta = float(plan.params.get("reduction_factor", 4))
    points: set[int] = set()
    for s in range(int(plan.params.get("brackets", 1))):
        # Tune's ASHA: bracket s has milestones grace * eta**(k + s), k = 0.. while below max_t
        k = 0
        while (m := g * eta ** (k + s)) < max_t:
            points.add(math.ceil(m))  # Tune records a rung at the first report at or past it
            k += 1
    return sorted(points)


def _asha_brackets(plan: SchedulerPlan, max_t: int) -> tuple[float, list[tuple[int, ...]]]:
    """(eta, each bracket's rungs followed by max_t), as Tune's ASHA lays them out."""
    eta = float(plan.params.get("reduction_factor", 4))
    g = plan.grace(max_t)
    return eta, [tuple(math.ceil(g * eta ** (k + s)) for k in range(64) if g * eta ** (k + s) < max_t) + (max_t,)
                 for s in range(int(plan.params.get("brackets", 1)))]


def expected_selection_work(plan: SchedulerPlan | None, max_t: int,
                            group_size: int | None = None) -> tuple[float, float, float]:
    """(share of the full grid's selection updates, intermediate scores per trial, share of the trials that
    reach ``max_t``) a scheduler is expected to cost; each intermediate score is one evaluation, at each of
    :func:`eval_points` a trial reaches, and only a trial that reaches ``max_t`` runs what a method does at
    the end of its training (GLoRA's subnet search).

    ASHA with no ``group_size``: every trial reaches the first rung and 1/eta of them each next one, the
    ideal of the synchronous algorithm. With ``group_size`` (the trials of one (method, task) group, which
    compete only with each other): Tune's asynchronous rule simulated (:func:`_async_asha`): a trial is
    stopped at a rung only when it scores below the (1 - 1/eta) quantile of the trials recorded there
    before it, so the first to arrive always goes on and small groups save much less (a group of two
    under eta 2 spends about 0.75 of its grid, as cw10-short's selection did on the H200). Several
    brackets: their mean (Tune spreads a group's trials over them about evenly). Median stopping has no
    closed form: priced at the full grid, every point evaluated, every trial to the end. No scheduler: the
    full grid, none, every trial."""
    if plan is None or max_t <= 0:
        return 1.0, 0.0, 1.0
    if plan.name == "sha":
        return _sync_halving(tuple(eval_points(plan, max_t)) + (max_t,),
                             float(plan.params.get("reduction_factor", 4)), group_size)
    if plan.name != "asha":
        return 1.0, float(len(eval_points(plan, max_t))), 1.0
    eta = float(plan.params.get("reduction_factor", 4))
    g = plan.grace(max_t)
    brackets = [tuple(math.ceil(g * eta ** (k + s)) for k in range(64) if g * eta ** (k + s) < max_t) + (max_t,)
                for s in range(int(plan.params.get("brackets", 1)))]
    work = []
    for levels in brackets:
        if group_size is None:
            spent = levels[0] + sum(eta ** -(i + 1) * (levels[i + 1] - levels[i]) for i in range(len(levels) - 1))
            work.append((spent / max_t, sum(eta ** -k for k in range(len(levels) - 1)), eta ** -(len(levels) - 1)))
        else:
            work.append(_async_asha(levels, eta, max(1, math.ceil(group_size / len(brackets)))))
    updates, reports, finished = (sum(w[i] for w in work) / len(work) for i in range(3))
    return updates, reports, finished


def expected_update_fraction(plan: SchedulerPlan | None, max_t: int, group_size: int | None = None) -> float:
    """The share of the full grid's selection updates a scheduler is expected to spend
    (:func:`expected_selection_work`)."""
    return expected_selection_work(plan, max_t, group_size)[0]


def expected_rung_reports(plan: SchedulerPlan | None, max_t: int, group_size: int | None = None) -> float:
    """How many intermediate scores a selection trial is expected to report (:func:`expected_selection_work`)."""
    return expected_selection_work(plan, max_t, group_size)[1]


@functools.lru_cache(maxsize=256)
def _async_asha(levels: tuple[int, ...], eta: float, n: int) -> tuple[float, float, float]:
    """(expected share of ``n`` trials' full-budget updates, expected rung reports per trial, expected share
    of the trials that reach max_t) under Tune's asynchronous ASHA, when the trials run side by side and
    reach each rung in a random order, and each keeps one quality throughout (the case most favourable to
    stopping). ``levels``: the rungs, then max_t. A fixed seed: a plan prints the same figures every time."""
    rng = random.Random(0)
    q = 1 - 1 / eta
    draws = max(50, 20_000 // n)  # about the same work for any group size
    total, reports, finished = 0.0, 0, 0
    for _ in range(draws):
        score = [rng.random() for _ in range(n)]
        alive = list(range(n))
        spent = [float(levels[-1])] * n
        for rung in levels[:-1]:
            rng.shuffle(alive)
            recorded: list[float] = []  # kept sorted: Tune's cutoff is numpy's linear percentile of these
            survivors = []
            reports += len(alive)
            for t in alive:
                if recorded:
                    pos = q * (len(recorded) - 1)
                    lo = int(pos)
                    hi = min(lo + 1, len(recorded) - 1)
                    cutoff = recorded[lo] + (recorded[hi] - recorded[lo]) * (pos - lo)
                else:
                    cutoff = None
                if cutoff is not None and score[t] < cutoff:
                    spent[t] = rung
                else:
                    survivors.append(t)
                bisect.insort(recorded, score[t])
            alive = survivors
        total += sum(spent) / (n * levels[-1])
        finished += len(alive)
    return total / draws, reports / (draws * n), finished / (draws * n)


def _sync_halving(levels: tuple[int, ...], eta: float, n: int | None) -> tuple[float, float, float]:
    """:func:`expected_selection_work` of synchronous successive halving: ``n`` trials reach the first rung,
    ``ceil(n / eta)`` of them the next, and so on (no ``n``: the fractions ``eta ** -k``)."""
    if n is None:
        alive = [eta ** -k for k in range(len(levels))]
        size = 1.0
    else:
        alive, size = [float(n)], float(max(1, n))
        for _ in levels[1:]:
            alive.append(float(keep_count(int(alive[-1]), eta)))
    spent = levels[0] * alive[0] + sum(alive[i + 1] * (levels[i + 1] - levels[i]) for i in range(len(levels) - 1))
    return spent / (size * levels[-1]), sum(alive[:-1]) / size, alive[-1] / size


def keep_count(n: int, eta: float) -> int:
    """How many of ``n`` trials at a rung go on under synchronous successive halving: ``ceil(n / eta)``."""
    return max(1, math.ceil(n / eta)) if n else 0


def rung_value(score: float, tiebreak: float | None = None) -> float:
    """The value a scheduler compares at a rung: ``score`` (the primary metric), plus ``tiebreak`` (a finer
    metric, better in the same direction) squashed below a millionth, so that it orders equal scores
    and never reverses unequal ones. Tune's ASHA stops a trial only when it scores strictly below the
    rung's cutoff, so with success on 10 episodes (steps of 0.1) every tie at the cutoff went on."""
    if tiebreak is None or not math.isfinite(tiebreak):
        return float(score)
    x = tiebreak / 1000.0
    return float(score) + _TIEBREAK_WEIGHT * x / (1.0 + abs(x))


def make_scheduler(plan: SchedulerPlan, metric: str, mode: str, max_t: int):
    """One Tune scheduler for one (method, task) group."""
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    params = dict(plan.params)
    params.setdefault("grace_period", plan.grace(max_t))
    if plan.name == "sha":
        return SyncHalving(eval_points(plan, max_t), float(params.get("reduction_factor", 4)), metric, mode)
    if plan.name == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, metric=metric, mode=mode, max_t=max_t, **params)
    return MedianStoppingRule(time_attr=TIME_ATTR, metric=metric, mode=mode, **params)


class SyncHalving:
    """Synchronous successive halving over one (method, task) group, with Tune's ``TrialScheduler`` hooks.

    A trial reporting at a rung (``TIME_ATTR`` in ``rungs``) is recorded there and paused (Tune saves it:
    for a function trainable, the checkpoint reported with that result) while any live trial of the group
    that may reach the rung has not; when the last arrives, the ``keep_count`` best (``metric`` by ``mode``;
    equal values: the earlier added trial) go on and the others stop, paused ones through the controller.
    A trial that stops, fails or finishes early leaves the group, which may complete a rung. The grouped
    scheduler's ``choose_trial_to_run`` starts a paused trial again only once it is promoted
    (:meth:`runnable`), after the pending ones.

    After a sweep is resumed its paused trials are unknown here (Tune keeps no scheduler state across a
    restore): they are runnable and go on from their checkpoints, so a resumed selection stops fewer.
    """

    def __init__(self, rungs: list[int], eta: float, metric: str, mode: str):
        self.rungs, self.eta, self.metric = list(rungs), eta, metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.order: dict[str, int] = {}  # trial id -> when it was added (ties)
        self.live: dict[str, Any] = {}  # trial id -> trial, until it stops, fails or finishes
        self.reach: dict[str, int] = {}  # trial id -> the last rung it may reach (index; promoted to it)
        self.recorded: list[dict[str, float]] = [{} for _ in self.rungs]
        self.decided: set[int] = set()  # rungs whose decision is made
        self.waiting: set[str] = set()  # paused at a rung, decision pending

    def on_trial_add(self, tune_controller, trial) -> None:
        self.order.setdefault(trial.trial_id, len(self.order))
        self.live[trial.trial_id] = trial
        self.reach.setdefault(trial.trial_id, 0)

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        from ray.tune.schedulers import TrialScheduler

        t = result.get(TIME_ATTR)
        if t is None or self.metric not in result or t not in self.rungs:
            return TrialScheduler.CONTINUE
        k = self.rungs.index(t)
        tid = trial.trial_id
        # reported again, after a restart from a checkpoint before this rung (a retried trial)
        if k in self.decided:
            return TrialScheduler.CONTINUE if self.reach.get(tid, 0) > k else TrialScheduler.STOP
        if tid in self.recorded[k]:
            self.waiting.add(tid)
            return TrialScheduler.PAUSE
        self.recorded[k][tid] = self.sign * float(result[self.metric])
        self.waiting.add(tid)
        return self._decide(tune_controller, k, current=tid)

    def _decide(self, tune_controller, k: int, current: str | None) -> str:
        """The rung ``k``'s decision once every live trial that may reach it has; the current trial's action."""
        from ray.tune.schedulers import TrialScheduler

        due = [tid for tid in self.live if self.reach.get(tid, 0) >= k]
        if k in self.decided or any(tid not in self.recorded[k] for tid in due):
            return TrialScheduler.PAUSE if current is not None else TrialScheduler.CONTINUE
        self.decided.add(k)
        ranked = sorted(due, key=lambda tid: (-self.recorded[k][tid], self.order[tid]))
        keep = set(ranked[:keep_count(len(ranked), self.eta)])
        action = TrialScheduler.CONTINUE
        for tid in ranked:
            self.waiting.discard(tid)
            if tid in keep:
                self.reach[tid] = k + 1
                continue
            trial = self.live.pop(tid)
            if tid == current:
                action = TrialScheduler.STOP
            else:
                tune_controller.stop_trial(trial)
        return action

    def _left(self, tune_controller, trial) -> None:
        if self.live.pop(trial.trial_id, None) is None:
            return
        self.waiting.discard(trial.trial_id)
        for k in range(len(self.rungs)):
            if k not in self.decided and any(tid in self.waiting for tid in self.recorded[k]):
                self._decide(tune_controller, k, current=None)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._left(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._left(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._left(tune_controller, trial)

    def runnable(self, trial) -> bool:
        """Whether a PAUSED trial may start again: promoted, or not paused by this scheduler."""
        return trial.trial_id not in self.waiting


def interleave_groups(specs: list[Any]) -> list[Any]:
    """``specs`` (ResolvedTrial) reordered round-robin over their (method, task) groups, each group's own
    order kept: the first of every group, then the second of every group, and so on.

    Tune starts trials in the order of its grid, as many at a time as fit. In grid order the trials of a
    group start side by side (cw10-short's 12-point LoRA grid on one H200: four of a group at a time), and
    reach each rung together, where asynchronous ASHA lets whichever trial arrives first at a rung go on
    (it has no earlier score to compare with). Interleaved, a group's trials arrive at its rungs one after
    another with more of its earlier scores recorded, which is the arrival order the plan's estimate
    (:func:`expected_selection_work`) assumes."""
    return round_robin(specs, lambda s: (s.method, s.task))


def round_robin(items: Iterable[_T], key: Callable[[_T], Hashable]) -> list[_T]:
    """``items`` round-robin over their groups by ``key``: the first of every group (groups in the order
    they first appear), then the second of every group, and so on; each group's own order kept."""
    groups: dict[Hashable, list[_T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    ordered: list[_T] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        ordered.extend(g[i] for g in groups.values() if i < len(g))
    return ordered


def _group_key(trial) -> tuple[str, str]:
    spec = trial.config["spec"]
    return spec["method"], spec["task"]


def grouped_scheduler(plan: SchedulerPlan, metric: str, mode: str, max_t: int):
    """A Tune scheduler that runs ``plan`` separately within each (method, task) group of trials."""
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class GroupedScheduler(FIFOScheduler):
        """Per (method, task), its own ASHA / median stopping rule; trials start in FIFO order (both
        schedulers are FIFO in that respect)."""

        def __init__(self):
            super().__init__()
            self._metric, self._mode = metric, mode
            self._groups: dict[tuple[str, str], TrialScheduler] = {}

        def _of(self, trial) -> TrialScheduler:
            key = _group_key(trial)
            if key not in self._groups:
                self._groups[key] = make_scheduler(plan, metric, mode, max_t)
            return self._groups[key]

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True  # metric and mode are fixed by the study's benchmark

        def on_trial_add(self, tune_controller, trial):
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial):
            self._of(trial).on_trial_error(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._of(trial).on_trial_remove(tune_controller, trial)

        def choose_trial_to_run(self, tune_controller):
            from ray.tune.experiment import Trial

            trials = tune_controller.get_trials()
            for trial in trials:
                if trial.status == Trial.PENDING:
                    return trial
            for trial in trials:  # paused by synchronous halving: only once promoted
                if trial.status == Trial.PAUSED and getattr(self._of(trial), "runnable", lambda t: True)(trial):
                    return trial
            return None

        def debug_string(self) -> str:
            return f"Selection under {plan.label()} per (method, task): {len(self._groups)} group(s)"

    return GroupedScheduler()


__all__ = ["RUNG_KEY", "SCHEDULERS", "TIME_ATTR", "SchedulerPlan", "SyncHalving", "eval_points",
           "expected_rung_reports", "expected_selection_work", "expected_update_fraction", "grouped_scheduler",
           "interleave_groups", "keep_count", "make_scheduler", "parse_scheduler", "round_robin", "rung_value"]

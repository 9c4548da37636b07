"""Which pending trial a reused process runs next (issue 20, item 4): one of the structure it just ran.

A reused process (``harness.process_cache``) skips compilation only for a trial whose model has the
structure of one it ran before: trainers of one structure share their compiled loss
(``harness.training.SharedLoss``). Tune hands a finished trial's actor to the trial its scheduler chooses
next; Tune's FIFO choice is the first pending trial of the grid, whatever its structure, so a process of a
wave meets every structure of the grid and compiles each (on the H200's ``bench scale``, 16 of 32 trials
compiled, the 12 in reused processes 4-12 s each; BENCHMARKS.md). Here:

- :func:`structure_order` orders a wave's trials round-robin over their structures, so the first trials
  Tune starts side by side, one per process, are of different structures;
- :class:`StructureAffinity` (a FIFO scheduler) chooses, once a trial has finished and its actor is cached,
  the first pending trial of that trial's structure, which Tune then starts in that actor.

Only the order in which trials start changes. A trial's record does not depend on the trials its process
ran before it (``tests/test_trial_checkpoint.py``), so the records are a FIFO run's. It is used only where no early-stopping scheduler runs:
under ASHA and its kin the order in which trials reach a rung changes which ones stop
(``harness.early_stopping.interleave_groups`` orders those). ``harness.process_cache.AFFINITY_ENV`` turns it
off.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable, Iterable, TypeVar

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from harness.early_stopping import round_robin
from harness.methods.base import COMMON_SETTINGS
from harness.tracks import get_track

_S = TypeVar("_S")


def structure_of(spec: dict[str, Any]) -> str:
    """What decides a trial's compiled graph, from its Tune config's ``spec`` (``ResolvedTrial.to_config``):
    everything but the seed, the optimiser's settings (``COMMON_SETTINGS``: learning rate, weight decay) and,
    where the track's model does not change with the task (``Track.model_varies_by_task``), the task.

    An approximation of ``harness.training.structure_key``, made before any model exists. It only groups
    trials: a trial grouped with others whose models differ compiles its own loss, as it would unrouted."""
    track = get_track(spec["track"])
    settings = {k: v for k, v in spec["method_settings"].items() if k not in COMMON_SETTINGS}
    part = {k: v for k, v in spec.items() if k not in ("seed", "method_settings", "task")}
    part["method_settings"] = settings
    if track.model_varies_by_task:
        part["task"] = spec["task"]
    return json.dumps(part, sort_keys=True, default=str)


def structure_order(specs: Iterable[_S], structure: Callable[[_S], str] | None = None) -> list[_S]:
    """``specs`` (``ResolvedTrial``) round-robin over their structures (:func:`structure_of`), each
    structure's own order kept and the structures in the order they first appear. ``structure``: the key of
    one spec (default: :func:`structure_of` of its ``to_config()``)."""
    return round_robin(specs, structure or (lambda s: structure_of(s.to_config())))


class StructureAffinity(FIFOScheduler):
    """Tune's FIFO scheduler, except that after a trial completes, the next trial it chooses is the first
    pending one of the completed trial's structure, if any is pending.

    Tune caches a completed trial's actor (``reuse_actors``) and, at its next step, gives the cached actor
    to the trial its scheduler chooses (``TuneController._maybe_add_actors``), so the process that just ran
    a structure runs it again and its compiled loss is reused. Trials that complete together queue their
    structures; each is served in turn. Tune calls :meth:`choose_trial_to_run` at every step and needs the
    same answer until that trial has a process, so a choice is kept while its trial waits for one. A trial
    that has one is still pending while Tune resets the process for it (longer on a busy host); keeping the
    choice then would leave the next finished trial's process to Tune's FIFO pick, so the choice moves on,
    and pending trials that have a process are not chosen again."""

    def __init__(self) -> None:
        super().__init__()
        self._freed: deque[str] = deque()
        self._chosen: Trial | None = None

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._freed.append(_trial_structure(trial))

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        if self._chosen is not None and _waiting(self._chosen):
            return self._chosen
        self._chosen = None
        pending = [t for t in tune_controller.get_trials() if _waiting(t)]
        while self._freed and pending:
            wanted = self._freed.popleft()
            match = next((t for t in pending if _trial_structure(t) == wanted), None)
            if match is not None:
                self._chosen = match
                return match
        return super().choose_trial_to_run(tune_controller)

    def __getstate__(self) -> dict[str, Any]:  # what a pickled copy keeps (a restored sweep starts afresh)
        return {**self.__dict__, "_freed": deque(), "_chosen": None}

    def debug_string(self) -> str:
        return "FIFO scheduling; a finished trial's process runs its structure's next pending trial"


def _waiting(trial: Trial) -> bool:
    """Whether ``trial`` is pending with no process yet: Tune sets a trial's actor when it hands it a cached
    one (then resets it) or when the trial's own actor has started, while the trial is still pending."""
    return trial.status == Trial.PENDING and trial.temporary_state.ray_actor is None


def _trial_structure(trial: Trial) -> str:
    return structure_of(trial.config["spec"])


__all__ = ["StructureAffinity", "structure_of", "structure_order"]

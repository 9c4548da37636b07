"""A reused process runs its last trial's structure next (issue 20, item 4; harness/trial_routing.py): the
structure a trial is grouped by, the round-robin start order, and Tune itself handing a finished trial's
actor to a pending trial of the same structure."""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass

from ray import tune

from harness.trial_routing import StructureAffinity, structure_of, structure_order


def _spec(track: str = "rl", task: str = "hammer", method: str = "lora", seed: int = 0, **settings) -> dict:
    return {"track": track, "benchmark": "cw10" if track == "rl" else "vtab1k", "task": task, "method": method,
            "method_settings": {"r": 8, "lr": 1e-3, "weight_decay": None, **settings}, "seed": seed,
            "budget": {}, "track_settings": {}, "targets": "", "alpha_rule": "", "adapter_bank": []}


def test_a_structure_leaves_out_the_seed_the_optimiser_and_a_task_the_model_does_not_depend_on():
    base = structure_of(_spec())
    assert structure_of(_spec(seed=3, lr=1e-4, weight_decay=0.1)) == base
    assert structure_of(_spec(task="push-wall")) == base  # one DT for every CW10 task
    assert structure_of(_spec(r=16)) != base and structure_of(_spec(method="dora")) != base
    vision = structure_of(_spec("vision", task="cifar100"))
    assert structure_of(_spec("vision", task="dtd")) != vision  # a head per dataset
    assert structure_of(_spec("vision", task="cifar100", seed=1, lr=1e-2)) == vision


@dataclass
class _Spec:
    name: str
    kind: str


def test_trials_start_round_robin_over_structures_each_in_its_own_order():
    specs = [_Spec(f"{k}{i}", k) for k in "aab" for i in range(2)] + [_Spec("c0", "c")]
    ordered = structure_order(specs, lambda s: s.kind)
    assert [s.name for s in ordered] == ["a0", "b0", "c0", "a1", "b1", "a0", "a1"]
    assert sorted(map(id, ordered)) == sorted(map(id, specs))


_SLEEP = dict(zip([(m, t) for m in ("lora", "dora", "vera") for t in ("hammer", "push-wall", "faucet-close",
                                                                          "push-back")],
                   random.Random(0).choices([0.2, 0.5, 1.0], k=12)))


def _structures_per_process(tmp_path, name: str, scheduler) -> dict[int, list[str]]:
    """Three structures x four trials of uneven length, two at a time in reused processes, in the order
    the sweep driver gives them: the structures each process ran, in order."""
    import ray

    sleeps = dict(_SLEEP)

    def trial(config: dict) -> None:  # defined here: Ray's workers cannot import a test module
        start = time.time()
        spec = config["spec"]
        time.sleep(sleeps[spec["method"], spec["task"]])
        tune.report({"pid": os.getpid(), "structure": spec["method"], "start": start})

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    specs = structure_order([_spec(method=m, task=t) for m, t in _SLEEP], lambda s: s["method"])
    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1}), param_space={"spec": tune.grid_search(specs)},
                       tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
    results = [r.metrics for r in tuner.fit()]
    assert len(results) == 12 and len({r["pid"] for r in results}) <= 2
    runs: dict[int, list[str]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r["start"]):
        runs[r["pid"]].append(r["structure"])
    return dict(runs)


def _switches(runs: dict[int, list[str]]) -> int:
    return sum(a != b for seq in runs.values() for a, b in zip(seq, seq[1:]))


def test_a_finished_trials_process_runs_the_next_trial_of_its_structure_under_tune(tmp_path):
    """Real Tune on the CPU: with the scheduler, each of the two processes switches structure only when its
    structure has no trial left, so the processes meet at most 3 + 2 - 1 (structure, process) pairs; Tune's
    FIFO order on the same grid makes them meet more."""
    runs = _structures_per_process(tmp_path, "routed", StructureAffinity())
    assert sum(len(set(seq)) for seq in runs.values()) <= 4 and _switches(runs) <= 2, runs
    fifo = _structures_per_process(tmp_path, "fifo", None)
    assert _switches(fifo) > _switches(runs), fifo


class _Controller:
    """What :class:`StructureAffinity` reads of Tune's controller: its trials."""

    def __init__(self, trials: list) -> None:
        self.trials = trials

    def get_trials(self) -> list:
        return self.trials


def test_a_choice_that_has_a_process_gives_way_to_the_next_finished_structure():
    """Tune gives the chosen trial a cached process and resets it there while the trial is still pending (long
    on a busy host). The next trial to finish meanwhile must get a trial of its own structure, not the kept
    choice, or Tune's FIFO pick takes its process (the under-Tune test above failed this way under CPU load)."""
    from ray.tune.experiment import Trial

    def trial(method: str, status: str) -> Trial:
        t = Trial("trainable", config={"spec": _spec(method=method)}, stub=True)
        t.set_status(status)
        return t

    a0, b0 = trial("lora", Trial.RUNNING), trial("dora", Trial.RUNNING)
    b1, a1 = trial("dora", Trial.PENDING), trial("lora", Trial.PENDING)
    tc, scheduler = _Controller([a0, b0, b1, a1]), StructureAffinity()
    assert scheduler.choose_trial_to_run(tc) is b1  # nothing finished: FIFO
    a0.set_status(Trial.TERMINATED)
    scheduler.on_trial_complete(tc, a0, {})
    assert scheduler.choose_trial_to_run(tc) is a1 and scheduler.choose_trial_to_run(tc) is a1  # kept
    a1.temporary_state.ray_actor = object()  # what Tune sets when it hands a1 a0's process
    b0.set_status(Trial.TERMINATED)
    scheduler.on_trial_complete(tc, b0, {})
    assert scheduler.choose_trial_to_run(tc) is b1

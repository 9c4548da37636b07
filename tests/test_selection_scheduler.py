"""Early stopping in the selection stage: ASHA (Ray Tune's) per (method, task) on intermediate val200
scores; stopped trials count with their last score, a setting is chosen from them and the final stage
trains it at full budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.early_stopping import (eval_points, expected_rung_reports, expected_selection_work,
                                    expected_update_fraction, parse_scheduler)
from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 2},
        "drop_path": 0.0, "weights": "random", "threads": 1}
STEPS, GRACE = 16, 4
LRS = [1.0e-9, 1.0e-2, 3.0e-2, 1.0e-1]  # on random features the first (barely moving) scores best on val200


def test_the_priced_share_of_a_small_group_follows_tunes_own_asha_rule():
    """The plan's simulation of asynchronous ASHA against Tune's own bracket, on the same random
    arrivals: a group of two or four under eta 2 saves far less than the synchronous ideal."""
    import random

    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    plan = parse_scheduler({"scheduler": "asha", "grace_period": 750, "reduction_factor": 2})
    rungs, max_t = [750, 1500], 3000
    for n in (2, 4):
        rng, spent, reports, finished = random.Random(1), 0.0, 0, 0
        for _ in range(3000):
            bracket = _Bracket(750, max_t, 2, 0)
            score = [rng.random() for _ in range(n)]
            alive, used = list(range(n)), [max_t] * n
            for rung in rungs:
                rng.shuffle(alive)
                survivors = []
                reports += len(alive)  # one evaluation per trial that reaches the rung
                for t in alive:
                    trial = type("T", (), {"trial_id": str(t)})()
                    if bracket.on_result(trial, rung, score[t]) == TrialScheduler.STOP:
                        used[t] = rung
                    else:
                        survivors.append(t)
                alive = survivors
            spent += sum(used) / (n * max_t)
            finished += sum(u == max_t for u in used)
        assert expected_update_fraction(plan, max_t, n) == pytest.approx(spent / 3000, abs=0.015)
        # the share that reaches the end: only those run GLoRA's search, which the plan prices for them alone
        assert expected_selection_work(plan, max_t, n)[2] == pytest.approx(finished / (3000 * n), abs=0.015)
        assert expected_rung_reports(plan, max_t, n) == pytest.approx(reports / (3000 * n), abs=0.03)
    assert expected_rung_reports(plan, max_t, 1) == 2.0  # a lone trial reports at both rungs
    assert expected_update_fraction(plan, max_t, 1) == 1.0  # a lone trial is never stopped
    assert expected_selection_work(plan, max_t, 1)[2] == 1.0
    shares = [expected_update_fraction(plan, max_t, n) for n in (2, 4, 16, 256)]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0.7
    assert shares[-1] == pytest.approx(expected_update_fraction(plan, max_t), abs=0.02)  # large: the ideal


def test_scheduler_settings_are_checked_with_tunes_names():
    plan = parse_scheduler({"scheduler": "asha", "grace_period": 4, "reduction_factor": 2})
    assert eval_points(plan, 16) == [4, 8]  # Tune's rungs below max_t
    assert expected_update_fraction(plan, 16) == pytest.approx((4 + (8 - 4) / 2 + (16 - 8) / 4) / 16)
    assert parse_scheduler({"scheduler": None}) is None
    with pytest.raises(ConfigError, match="grace_perod.*valid: grace_period"):
        parse_scheduler({"scheduler": "asha", "grace_perod": 4})
    with pytest.raises(ConfigError, match="max_t: set by the harness"):
        parse_scheduler({"scheduler": "asha", "max_t": 4})
    with pytest.raises(ConfigError, match="use 'sha' for synchronous successive halving"):
        parse_scheduler({"scheduler": "hyperband"})
    with pytest.raises(ConfigError, match="reduction_factor"):
        parse_scheduler({"scheduler": "asha", "reduction_factor": 1})
    with pytest.raises(ConfigError, match="without a scheduler"):
        parse_scheduler({"scheduler": None, "grace_period": 3})


def test_asha_stops_selection_trials_and_the_chosen_setting_runs_in_full(selection_bench):
    """The scheduler run of tests/conftest.py's ``bench selection``: a sweep of ``full`` over LRS under ASHA
    (grace GRACE of STEPS updates, reduction factor 2, one trial at a time, checkpoints every GRACE)."""
    done = selection_bench.done
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    base = selection_bench.folder / "work" / "scheduler"
    select = selection_bench.select_records("scheduler")
    final = [r for r in selection_bench.final_records("scheduler") if r["method"] == "full"]
    assert len(select) == len(LRS) and all(r["status"] == "ok" for r in select)
    stopped = [r for r in select if "stopped_at_update" in json.loads(r["extra"])]
    assert stopped, "no selection trial was stopped"
    ran = [r for r in select if r not in stopped]
    assert max(r["top1"] for r in stopped) < max(r["top1"] for r in ran)  # stopped for scoring worse
    assert all(json.loads(r["extra"])["stopped_at_update"] in (GRACE, 2 * GRACE) for r in stopped)
    # a stopped trial's cost is counted too: its updates and its wall time so far
    assert all(json.loads(r["extra"])["updates"] == json.loads(r["extra"])["stopped_at_update"]
               and r["wall_time_s"] > 0 for r in stopped)
    spent = sum(json.loads(r["extra"]).get("stopped_at_update", STEPS) for r in select)
    assert spent < STEPS * len(LRS)  # fewer updates than the full grid
    # the setting chosen is the best score among all selection trials, stopped ones with their last score
    best = max(select, key=lambda r: r["top1"])
    assert len(final) == 1 and final[0]["status"] == "ok"
    assert json.loads(final[0]["settings"])["lr"] == json.loads(best["settings"])["lr"]
    assert json.loads(final[0]["extra"])["updates"] == STEPS  # the final stage is never stopped early
    assert final[0]["selection"].startswith("held-out/asha(") and final[0]["grid_size"] == len(LRS)
    # trials the scheduler stopped (at a rung, or at max_t before their own clean-up) keep no checkpoint
    assert not list(base.rglob("checkpoint_*"))


def test_selection_trials_are_interleaved_across_groups_for_the_scheduler():
    """Under a scheduler the selection grid runs round-robin over (method, task) groups, each group's own
    order kept, so that a group's trials reach ASHA's rungs one after another (issue 20: in grid order the
    H200 ran one group's four trials side by side and each went on at its first rung)."""
    from harness.early_stopping import interleave_groups
    from harness.sweep_file import load_sweep, study_trials

    sets = ["tasks=[hammer,push-back,stick-pull]", "methods={lora: {r: [4, 8], lr: [1.0e-4, 1.0e-3]}, "
            "full: {lr: [1.0e-4, 3.0e-4]}}"]
    study = load_sweep(ROOT / "sweeps" / "cw10-short.yaml", sets, only="cw10-short", confirmed=True).studies[0]
    specs = study_trials(study, "select")
    groups = [(s.method, s.task) for s in specs]
    assert groups[:4] == [groups[0]] * 4  # grid order: one group's trials first, side by side
    ordered = interleave_groups(specs)
    assert sorted(map(id, ordered)) == sorted(map(id, specs))  # the same trials, each once
    n_groups = len(set(groups))
    assert n_groups == 6
    first_round = [(s.method, s.task) for s in ordered[:n_groups]]
    assert sorted(first_round) == sorted(set(groups))  # every group's first trial before any group's second
    for g in set(groups):  # each group keeps its own order
        assert [s for s in ordered if (s.method, s.task) == g] == [s for s in specs if (s.method, s.task) == g]
    assert interleave_groups([]) == []


def test_rung_value_breaks_ties_by_the_finer_metric_and_never_reverses_scores():
    """What ASHA ranks at a rung: success, then return. On 10 episodes success moves in steps of 0.1 and
    Tune's ASHA stops only a trial strictly below the cutoff, so a tie at the cutoff always went on."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    from harness.early_stopping import rung_value

    returns = [-5000.0, -1.0, 0.0, 1.0, 300.0, 999.0, 1500.0, 1e6]
    values = [(k / 10, r) for k in range(11) for r in returns]
    ranked = sorted(values, key=lambda v: rung_value(*v))
    assert ranked == sorted(values)  # by success first, then by return, whatever the return's size
    assert rung_value(0.3) == 0.3 and rung_value(0.3, float("nan")) == 0.3

    def decide(key):  # a third trial ties the cutoff of two earlier ones on success, with a lower return
        bracket = _Bracket(1, 10, 4, 0)
        actions = []
        for i, (score, ret) in enumerate([(0.3, 700.0), (0.3, 650.0), (0.3, 400.0)]):
            trial = type("T", (), {"trial_id": str(i)})()
            actions.append(bracket.on_result(trial, 1, key(score, ret)))
        return actions[-1]

    assert decide(lambda s, r: s) == TrialScheduler.CONTINUE  # success alone: the tie goes on
    assert decide(rung_value) == TrialScheduler.STOP  # with the return: the weakest of the tie stops


def test_the_scheduler_reads_the_rung_score_with_the_benchmarks_tiebreak():
    """RL selection under ASHA ranks rungs by success then return; vision's val200 top-1 has no tiebreak."""
    from harness.early_stopping import RUNG_KEY
    from harness.sweep_file import load_sweep, study_trials
    from harness.tune_trial import TuneTrialPlan, tune_trial_plan

    rl = load_sweep(ROOT / "sweeps" / "cw10-short.yaml", ["tasks=[hammer]"], only="cw10-short",
                    confirmed=True).studies[0]
    plan, scheduler = tune_trial_plan(rl, study_trials(rl, "select"))
    assert (plan.metric, plan.tiebreak) == ("success", "return")
    assert scheduler._of(type("T", (), {"config": {"spec": {"method": "lora", "task": "hammer"}},
                                        "trial_id": "x"})())._metric == RUNG_KEY
    assert TuneTrialPlan.from_config({"tune_trial": plan.to_config()}) == plan  # what the trainable receives
    final_plan, none = tune_trial_plan(rl, study_trials(rl, "final"))
    assert none is None and final_plan.tiebreak == ""
    vision = load_sweep(ROOT / "sweeps" / "vtab1k.yaml", ["selection={seeds: [0], scheduler: asha}"],
                        confirmed=True).studies[0]
    vplan, vscheduler = tune_trial_plan(vision, study_trials(vision, "select"))
    assert vscheduler is not None and (vplan.metric, vplan.tiebreak) == ("top1", "")


class _Controller:
    """What SyncHalving asks of Tune's controller: to stop a trial it had paused."""

    def __init__(self):
        self.stopped: list[str] = []

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)


def _group(rungs: list[int], mode: str):
    """A SyncHalving over trials a-d (factor 2), a stand-in controller, the trials, and report(t, at, score)."""
    from harness.early_stopping import RUNG_KEY, TIME_ATTR, SyncHalving

    sched, ctl = SyncHalving(rungs, 2.0, RUNG_KEY, mode), _Controller()
    trials = {t: type("T", (), {"trial_id": t})() for t in "abcd"}
    for t in trials.values():
        sched.on_trial_add(ctl, t)

    def report(t: str, at: int, score: float) -> str:
        return sched.on_trial_result(ctl, trials[t], {TIME_ATTR: at, RUNG_KEY: score})

    return sched, ctl, trials, report


def test_synchronous_halving_waits_for_the_whole_group_at_each_rung():
    """Four trials, rungs 4 and 8 of 16, factor 2: every trial waits (PAUSE) at a rung until all live ones
    of its group have reached it; then the best ceil(n/2) go on and the others stop, the current trial by
    its action and paused ones through the controller. A trial that fails while others wait completes the
    rung; ties go to the earlier trial."""
    from ray.tune.schedulers.trial_scheduler import TrialScheduler as TS

    sched, ctl, trials, report = _group([4, 8], "max")

    assert sched.on_trial_result(ctl, trials["a"], {"update": 2}) == TS.CONTINUE  # a progress report
    assert [report("a", 4, 0.5), report("b", 4, 0.9), report("c", 4, 0.1)] == [TS.PAUSE] * 3
    assert not any(sched.runnable(trials[t]) for t in "abc")  # paused and waiting: not to be started again
    assert report("d", 4, 0.3) == TS.STOP  # the last arrival decides: b and a go on, c and d stop
    assert ctl.stopped == ["c"] and sched.runnable(trials["a"]) and sched.runnable(trials["b"])
    assert report("b", 8, 0.2) == TS.PAUSE  # b waits for a at the second rung
    assert report("a", 8, 0.2) == TS.CONTINUE  # a tie: the trial added first (a) goes on, b stops
    assert ctl.stopped == ["c", "b"] and not sched.live.keys() - {"a"}
    assert report("a", 16, 0.7) == TS.CONTINUE  # max_t: no rung, the trial finishes
    # a retried trial that reports a decided rung again: on if it was promoted there, else stopped
    assert report("a", 4, 0.0) == TS.CONTINUE and report("c", 4, 0.9) == TS.STOP


def test_synchronous_halving_decisions_with_ties_and_failures():
    from ray.tune.schedulers.trial_scheduler import TrialScheduler as TS

    sched, ctl, trials, report = _group([4, 8], "max")

    assert report("a", 4, 0.5) == TS.PAUSE and report("b", 4, 0.9) == TS.PAUSE
    sched.on_trial_error(ctl, trials["c"])  # c fails before its rung: the rung waits for d alone
    assert report("d", 4, 0.5) == TS.STOP  # three at the rung, keep 2: b, then a (tied with d, added first)
    assert ctl.stopped == [] and sched.runnable(trials["a"])
    assert report("b", 8, 0.4) == TS.PAUSE
    sched.on_trial_complete(ctl, trials["a"], {})  # a ends on its own before the rung: b decides alone
    assert sched.runnable(trials["b"]) and ctl.stopped == []
    # lower is better: the lowest scores go on
    _, ctl2, _, low = _group([4], "min")
    acts = [low(t, 4, v) for t, v in zip("abcd", (0.4, 0.1, 0.3, 0.2))]
    assert acts == [TS.PAUSE] * 3 + [TS.CONTINUE] and sorted(ctl2.stopped) == ["a", "c"]


def test_synchronous_halving_is_priced_at_the_textbook_share():
    """12 grid points, grace 125 of 1,000 updates, factor 4 (issue 20's H200 comparison): 12 x 125 + 3 x 375
    + 1 x 500 = 3,125 of 12,000 updates, whatever order the trials arrive in."""
    plan = parse_scheduler({"scheduler": "sha", "grace_period": 125, "reduction_factor": 4})
    assert eval_points(plan, 1000) == [125, 500]
    share, reports, finished = expected_selection_work(plan, 1000, 12)
    assert share == pytest.approx(3125 / 12000) and reports == pytest.approx((12 + 3) / 12)
    assert finished == pytest.approx(1 / 12)
    assert expected_update_fraction(plan, 1000, 12) < expected_update_fraction(
        parse_scheduler({"scheduler": "asha", "grace_period": 125, "reduction_factor": 4}), 1000, 12)
    with pytest.raises(ConfigError, match="brackets.*valid: grace_period, reduction_factor"):
        parse_scheduler({"scheduler": "sha", "brackets": 2})


def test_a_sweep_under_synchronous_halving_pauses_at_rungs_and_resumes_from_checkpoints(selection_bench,
                                                                                       tmp_path):
    """The bench's tiny vision study (``full`` over LRS, STEPS updates, rungs at GRACE and 2 GRACE, factor 2)
    under ``scheduler: sha``, run as a user runs a sweep (working folder, relative paths), two trials at a
    time: no trial passes a rung before all live ones reached it; 4 -> 2 -> 1 trials; the promoted trials
    continue from their rung checkpoints, and the one that trains to the end gives the record the full
    grid's trial of the same setting gave (tests/conftest.py's grid run), update for update."""
    import os
    import subprocess
    import sys

    import yaml

    doc = yaml.safe_load((selection_bench.folder / "sel.yaml").read_text())
    doc["selection"] = {"seeds": [0], "scheduler": "sha", "grace_period": GRACE, "reduction_factor": 2}
    doc["methods"] = {"full": {"lr": LRS}}
    doc["resources"].pop("max_concurrent")
    (tmp_path / "sha.yaml").write_text(yaml.safe_dump(doc))
    env = {**selection_bench.env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "harness", "sweep", "sha.yaml", "--results", "res", "--leaderboard",
                           "board", "--no-dashboard", "--cpus", "2", "--selection-only"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    path = next((tmp_path / "res").rglob("*-select-records.jsonl"))
    select = [json.loads(x) for x in path.read_text().splitlines()]
    reached = sorted(json.loads(r["extra"]).get("stopped_at_update", STEPS) for r in select)
    assert reached == [GRACE, GRACE, 2 * GRACE, STEPS]
    assert all(r["selection"].startswith("held-out/sha(") for r in select)
    # synchronous: every rung report of the first rung came before any of the second
    reports = [json.loads(line) for path in (tmp_path / "res").rglob("result.json")
               for line in path.read_text().splitlines() if '"selection_update"' in line]
    first = [r["timestamp"] for r in reports if r["selection_update"] == GRACE]
    second = [r["timestamp"] for r in reports if r["selection_update"] == 2 * GRACE]
    assert len(first) == 4 and len(second) == 2 and max(first) <= min(second)
    # the trials kept at a rung scored at least as well there as the ones stopped
    at_first = {json.loads(r["record"])["settings"]["lr"]: r["rung_score"] for r in reports
                if r["selection_update"] == GRACE}
    kept = [json.loads(r["settings"])["lr"] for r in select
            if json.loads(r["extra"]).get("stopped_at_update", STEPS) > GRACE]
    assert min(at_first[k] for k in kept) >= max(v for k, v in at_first.items() if k not in kept)
    # the one that trained to the end went through both pauses, from its checkpoints
    winner = next(r for r in select if "stopped_at_update" not in json.loads(r["extra"]))
    assert json.loads(winner["extra"]).get("resumed_from_update") == 2 * GRACE
    grid = {r["settings"]: r for r in selection_bench.select_records("grid")}[winner["settings"]]
    assert (winner["top1"], winner["train_loss"]) == (grid["top1"], grid["train_loss"])
    assert not list((tmp_path / "res").rglob("checkpoint_*"))  # the rung checkpoints go with the study's end


def test_synchronous_halving_refuses_a_concurrency_cap_before_any_compute():
    """Tune counts a trial paused at a rung against max_concurrent_trials: with a cap, the rung would wait
    for trials that never start. The sweep file is refused, naming both keys."""
    from harness.sweep_file import load_sweep

    sets = ["tasks=[hammer]", "selection={seeds: [0], scheduler: sha, grace_period: 750}"]
    study = load_sweep(ROOT / "sweeps" / "cw10-short.yaml", sets, only="cw10-short", confirmed=True).studies[0]
    assert study.selection.scheduler == "sha"
    with pytest.raises(ConfigError, match="resources.max_concurrent=2 with selection.scheduler 'sha'"):
        load_sweep(ROOT / "sweeps" / "cw10-short.yaml", [*sets, "resources.max_concurrent=2"], only="cw10-short",
                   confirmed=True)

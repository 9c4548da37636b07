"""`sweep --plan`: the price of a sweep from measured per-update costs, with nothing computed or written."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from agents.tasks import EPISODE_LENGTH
from harness.early_stopping import expected_update_fraction, parse_scheduler

ROOT = Path(__file__).resolve().parents[1]
COSTS = json.loads((ROOT / "benchmarks" / "update-costs.json").read_text())["devices"]


def plan(tmp_path: Path, doc: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -m harness sweep FILE --plan ...`` through the command line's own entry point, in this
    process: the same parsing, validation, output and exit status as the command, without paying a fresh
    interpreter's imports per call (``main`` is what ``python -m harness`` calls)."""
    from harness.cli import main

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    argv = ["sweep", str(path), "--plan", "--results", str(tmp_path / "results"), "--leaderboard",
            str(tmp_path / "board"), *args]
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
        mp.chdir(ROOT)
        code = main(argv)
    assert os.getcwd() == cwd
    return subprocess.CompletedProcess(["python", "-m", "harness", *argv], code, out.getvalue(), err.getvalue())


def rows(out: str) -> dict[str, list[str]]:
    """Table rows by stage (first word), split on whitespace."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 7 and parts[0] == "paper":
            found[parts[1]] = parts
    return found


# The paper DT (the track's defaults) at a small budget: what the cost table measured.
STUDY = {"name": "paper", "track": "rl", "benchmark": "cw10", "tasks": ["window-close", "hammer"],
         "protocol": "select-then-final", "selection": {"seeds": [0]}, "seeds": [0, 1, 2],
         "budget": {"steps": 120_000, "eval_episodes": 5, "batch_size": 128},
         "methods": {"lora": {"r": [2, 4], "lr": [1.0e-3, 1.0e-4]}},
         "resources": {"cpus_per_trial": 2, "gpus_per_trial": "auto"}}


def expected(trials: int, steps: int, episodes: int, gpus: int, share: float = 1.0, stage: str = "select"
             ) -> tuple[int, float, float]:
    """(updates, GPU-hours, wall hours) by the plan's model, from the cost table and the study's budget (LoRA
    trials, no scheduler: their measured overheads in ``stage`` beside training and evaluation, the
    end-of-training ones too, as every trial reaches the end)."""
    m, packing = COSTS["NVIDIA H200"]["rl"], COSTS["NVIDIA H200"]["packing"]["speedup"]
    measured = m["trial_overhead"]
    overhead = measured["start_s"] + measured["seconds"][stage]["lora"] + measured["end_seconds"][stage]["lora"]
    per_gpu = min(4, math.ceil(trials / gpus))
    speed = 1.0 + (packing["4"] - 1.0) * (per_gpu - 1) / 3  # measured at 1 and 4, linear between
    train_s = steps * m["ms_per_update"]["compiled"] / 1000 * share
    eval_s = episodes * EPISODE_LENGTH / (m["rollout_env_steps_per_s"] / m["rollout_envs"] * min(episodes, 10))
    gpu_s = trials * (train_s / speed + (eval_s + overhead) / per_gpu)
    used = min(gpus, math.ceil(trials / per_gpu))
    wall = max(gpu_s / used, train_s * per_gpu / speed + eval_s + overhead)
    return round(trials * steps * share), gpu_s / 3600, wall / 3600


def test_plan_prices_each_stage_from_the_measured_costs_and_writes_nothing(tmp_path):
    done = plan(tmp_path, STUDY, "--gpus", "2", "--gpu-model", "NVIDIA H200")
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    assert "h200-bench-rl.json" in done.stdout  # it says which measurement priced it
    assert "per-trial overheads from benchmarks/h200-cw10-short-overheads.json" in done.stdout
    # selection: 2 tasks x 4 grid points x 1 seed; final: 2 tasks x 1 chosen point x 3 seeds
    for stage, trials in (("select", 8), ("final", 6)):
        updates, gpu_h, wall_h = expected(trials, 120_000, 5, gpus=2, stage=stage)
        row = table[stage]
        assert int(row[3]) == trials
        assert int(row[4].replace(",", "")) == updates
        assert abs(float(row[5]) - gpu_h) <= 0.005 and abs(float(row[6]) - wall_h) <= 0.005  # printed to 2 decimals
    assert not (tmp_path / "results").exists() and not (tmp_path / "board").exists()
    assert not (tmp_path / "cache").exists()  # nothing built, not even the pretrained model


def test_plan_on_more_gpus_is_faster_but_not_cheaper(tmp_path):
    one, eight = (rows(plan(tmp_path, STUDY, "--gpus", n, "--gpu-model", "NVIDIA H200").stdout)["select"]
                  for n in ("1", "8"))
    assert float(eight[6]) < float(one[6])  # wall hours
    assert float(eight[5]) >= float(one[5])  # fewer trials share a GPU: no packing gain


def test_plan_under_asha_prices_the_expected_share_of_selection_updates(tmp_path):
    doc = dict(STUDY, selection={"seeds": [0], "scheduler": "asha", "grace_period": 100, "reduction_factor": 3})
    done = plan(tmp_path, doc, "--gpus", "2", "--gpu-model", "NVIDIA H200")
    assert done.returncode == 0, done.stdout + done.stderr
    # rungs at 100, 300, ..., 72900 of 120000 updates; each task's four grid points form one group, and
    # under Tune's asynchronous rule the first of a group to reach a rung always goes on: at least a
    # quarter of the grid's updates, far above the synchronous ideal (all reach 100, a third 300, ...)
    levels = [100 * 3 ** k for k in range(7)] + [120_000]
    ideal = (100 + sum((levels[i + 1] - levels[i]) / 3 ** (i + 1) for i in range(7))) / 120_000
    line = next(x for x in done.stdout.splitlines() if x.startswith("paper") and "select" in x)
    assert "asha(" in line and "rung evaluations per trial" in line  # rung evaluations are priced too
    updates = int(re.search(r"\s(\d[\d,]*)\s+\d+\.\d\d", line).group(1).replace(",", ""))
    sched = parse_scheduler({k: v for k, v in doc["selection"].items() if k != "seeds"})
    assert updates == round(8 * 120_000 * expected_update_fraction(sched, 120_000, 4))
    assert 0.25 <= updates / (8 * 120_000) < 0.3 and ideal < 0.01
    final = rows(done.stdout)["final"]
    assert int(final[4].replace(",", "")) == 6 * 120_000  # the final stage always runs its whole budget


def test_plan_without_a_measurement_says_so_and_how_to_get_one(tmp_path):
    done = plan(tmp_path, STUDY, "--gpus", "1", "--gpu-model", "Some Other GPU")
    assert done.returncode == 0, done.stderr
    assert "no measurement for this device (Some Other GPU)" in done.stdout
    assert "python -m harness bench" in done.stdout
    assert int(rows(done.stdout)["select"][4].replace(",", "")) == 8 * 120_000  # updates are still counted


def test_plan_validates_as_a_sweep_does(tmp_path):
    bad = dict(STUDY, selection={"scheduler": "asha", "grace_perod": 10})
    done = plan(tmp_path, bad, "--gpus", "1")
    assert done.returncode == 2
    assert "grace_perod" in done.stderr and "grace_period" in done.stderr
    bad = dict(STUDY, budget={"steps": -1})
    assert plan(tmp_path, bad, "--gpus", "1").returncode == 2
    assert not (tmp_path / "results").exists()


def test_the_plan_prices_the_work_each_track_says_a_trial_does(tmp_path, monkeypatch):
    """Issue 19, item 3: the planner imports no track; a track says what one trial does before any data is
    loaded (``Track.planned_work``: updates, an evaluation episode's steps) and the plan prices that."""
    import sys

    from harness.sweep_file import load_sweep, study_trials
    from harness.tracks import PlannedWork, get_track

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    track = get_track("rl")
    trial = study_trials(load_sweep(path).studies[0], "select")[0]
    assert track.planned_work(trial) == PlannedWork(120_000, episode_steps=EPISODE_LENGTH)
    monkeypatch.setattr(type(track), "planned_work",
                        lambda self, spec: PlannedWork(60_000, episode_steps=10 * EPISODE_LENGTH))
    done = plan(tmp_path, STUDY, "--gpus", "2", "--gpu-model", "NVIDIA H200")
    assert done.returncode == 0, done.stdout + done.stderr
    row = rows(done.stdout)["select"]
    assert int(row[4].replace(",", "")) == 8 * 60_000
    # the rollouts are priced at the track's episode length: the plan's model with episodes ten times as long
    m = COSTS["NVIDIA H200"]["rl"]
    eval_s = 5 * 10 * EPISODE_LENGTH / (m["rollout_env_steps_per_s"] / m["rollout_envs"] * 5)
    assert f"rollouts {eval_s:.0f} s/trial" in " ".join(row), row
    monkeypatch.setattr(sys.modules[__name__], "EPISODE_LENGTH", 10 * EPISODE_LENGTH)
    _, gpu_h, wall_h = expected(8, 60_000, 5, gpus=2)
    assert abs(float(row[5]) - gpu_h) <= 0.005 and abs(float(row[6]) - wall_h) <= 0.005


def test_measured_overheads_hold_a_share_of_the_gpu_per_trial():
    """A trial's start-up, wrap, compilation and save (``trial_overhead``) cost its GPU share for as long
    as they were measured to last; a method without its own figure takes the stage's mean of all. An entry
    written before ``end_seconds`` (as here) is still read, its ``seconds`` paid by every trial."""
    from harness.plan import plan_wave
    from harness.sweep_file import SweepFile, study_trials

    study = SweepFile.model_validate({"name": "t", "studies": [STUDY]}).studies[0]
    specs = study_trials(study, "select")
    device = json.loads(json.dumps(COSTS["NVIDIA H200"]))
    device["rl"]["trial_overhead"] = {"source": "a test", "start_s": 10.0,
                                      "seconds": {"select": {"default": 100.0, "lora": 40.0}}}
    priced = plan_wave(study, "select", 0, specs, 2, device)
    del device["rl"]["trial_overhead"]
    bare = plan_wave(study, "select", 0, specs, 2, device)
    per_gpu = priced.per_gpu
    assert priced.gpu_hours - bare.gpu_hours == pytest.approx(len(specs) * 50.0 / per_gpu / 3600)
    assert "per-trial overheads from a test" in priced.notes and not any("overheads" in n for n in bare.notes)
    device["rl"]["trial_overhead"] = {"source": "a test", "start_s": 10.0, "seconds": {"select": {"default": 100.0}}}
    other = plan_wave(study, "select", 0, specs, 2, device)
    assert other.gpu_hours - bare.gpu_hours == pytest.approx(len(specs) * 110.0 / per_gpu / 3600)


def test_under_synchronous_halving_each_resume_from_a_rung_pays_the_start_up_again():
    """``sha`` pauses a trial at a rung and starts it again from its checkpoint if promoted: each such
    restart holds the GPU share for the trial's start-up overheads once more, as planned per trial; the
    longest trial restarts at every rung."""
    from harness.plan import plan_wave
    from harness.sweep_file import SweepFile, study_trials

    study = SweepFile.model_validate({"name": "t", "studies": [STUDY]}).studies[0]
    specs = study_trials(study, "select")
    device = json.loads(json.dumps(COSTS["NVIDIA H200"]))
    device["rl"]["trial_overhead"] = {"source": "a test", "start_s": 10.0, "seconds": {"select": {"default": 100.0}}}
    once = plan_wave(study, "select", 0, specs, 2, device)
    resumed = plan_wave(study, "select", 0, specs, 2, device, restarts=(0.5, 2))
    assert resumed.gpu_hours - once.gpu_hours == pytest.approx(len(specs) * 0.5 * 110.0 / once.per_gpu / 3600)
    assert resumed.wall_hours >= once.wall_hours and any("restarts from a rung checkpoint" in n for n in resumed.notes)


def test_under_asha_only_the_trials_expected_to_reach_the_end_pay_the_end_of_training_step():
    """Issue 20: GLoRA's subnet search (``end_seconds``) runs only in a trial that reaches the end of its
    budget. A selection under ASHA prices it for the simulated share of each (method, task) group's trials
    that get there (:func:`expected_selection_work`, the simulation that prices its updates), so below the
    full search per trial; the final stage, which runs every trial to its end, prices it in full."""
    from harness.early_stopping import expected_selection_work
    from harness.plan import plan_sweep
    from harness.sweep_file import SweepFile

    doc = dict(STUDY, selection={"seeds": [0], "scheduler": "asha", "grace_period": 100, "reduction_factor": 3})
    sweep = SweepFile.model_validate({"name": "t", "studies": [doc]})

    def priced(search_s: float) -> dict[str, object]:
        costs = json.loads(json.dumps(COSTS))
        costs["NVIDIA H200"]["rl"]["trial_overhead"] = {  # LoRA as GLoRA: 20 s always, the search at the end
            "source": "a test", "start_s": 10.0, "seconds": {"select": {"lora": 20.0}, "final": {"lora": 20.0}},
            "end_seconds": {"select": {"lora": search_s}, "final": {"lora": search_s}}}
        waves, _ = plan_sweep(sweep, 2, "NVIDIA H200", costs)
        return {w.stage.split(" ")[0]: w for w in waves}

    searched, bare = priced(300.0), priced(0.0)
    sched = parse_scheduler({k: v for k, v in doc["selection"].items() if k != "seeds"})
    reach = expected_selection_work(sched, 120_000, 4)[2]  # each task's four grid points form one group
    assert 0 < reach < 1
    per_gpu = searched["select"].per_gpu
    added = (searched["select"].gpu_hours - bare["select"].gpu_hours) * 3600 * per_gpu
    assert added == pytest.approx(8 * reach * 300.0) and added < 8 * 300.0
    said = f"end-of-training overheads for the {reach:.2g} of trials expected to reach the end"
    assert said in searched["select"].notes
    assert "per-trial overheads from a test" in searched["select"].notes
    # the longest trial is one that reaches the end: its search in full
    assert searched["select"].wall_hours > bare["select"].wall_hours
    final_per_gpu = searched["final"].per_gpu
    added = (searched["final"].gpu_hours - bare["final"].gpu_hours) * 3600 * final_per_gpu
    assert added == pytest.approx(6 * 300.0)
    assert not any("end-of-training" in n for n in searched["final"].notes)


def test_later_evaluations_on_kept_workers_are_priced_at_their_own_rate_where_measured():
    """An RL trial keeps its simulator workers for all its evaluations (agents.rollout.TrialRollouts), so
    where the device entry has bench rl's kept-pool rate, each evaluation after the first (ASHA's rungs come
    before the final one) is priced at it; without it, as before. The final stage, one evaluation per trial,
    does not change."""
    from harness.plan import plan_sweep
    from harness.sweep_file import SweepFile

    doc = dict(STUDY, selection={"seeds": [0], "scheduler": "asha", "grace_period": 100, "reduction_factor": 3})
    sweep = SweepFile.model_validate({"name": "t", "studies": [doc]})
    costs = json.loads(json.dumps(COSTS))
    rl = costs["NVIDIA H200"]["rl"]
    rl.pop("rollout_kept_env_steps_per_s", None)
    before = {w.stage.split(" ")[0]: w for w in plan_sweep(sweep, 2, "NVIDIA H200", costs)[0]}
    rl["rollout_kept_env_steps_per_s"] = 4 * rl["rollout_env_steps_per_s"]  # a later evaluation: a quarter
    after = {w.stage.split(" ")[0]: w for w in plan_sweep(sweep, 2, "NVIDIA H200", costs)[0]}
    first = 5 * EPISODE_LENGTH / (rl["rollout_env_steps_per_s"] / rl["rollout_envs"] * 5)
    sched = parse_scheduler({k: v for k, v in doc["selection"].items() if k != "seeds"})
    from harness.early_stopping import expected_selection_work

    rungs = expected_selection_work(sched, 120_000, 4)[1]  # each task's four grid points form one group
    assert rungs > 0
    per_gpu = after["select"].per_gpu
    saved = (before["select"].gpu_hours - after["select"].gpu_hours) * 3600 * per_gpu
    assert saved == pytest.approx(8 * rungs * 0.75 * first)
    assert after["final"].gpu_hours == pytest.approx(before["final"].gpu_hours)
    assert any("for each later one, on the trial's kept workers" in n for n in after["select"].notes)
    assert not any("kept workers" in n for n in before["select"].notes)


def test_a_compile_mode_is_priced_at_its_own_measurement_where_there_is_one(tmp_path, monkeypatch):
    """Issue 21: trials with ``compile_mode: reduce-overhead`` (CUDA graphs) are priced at the figures measured
    in that mode; a method not measured in it at torch's default mode's figure, and the row says so."""
    study = {"name": "paper", "track": "vision", "benchmark": "builtin", "tasks": ["shapes"], "protocol": "grid",
             "seeds": [0], "budget": {"steps": 1_000_000, "batch_size": 64},
             "settings": {"backbone": "vit_base_patch16_224", "img_size": 224, "weights": "random", "compile": True},
             "methods": {"full": {"lr": [1.0e-3]}}}
    m = COSTS["NVIDIA H200"]["vision"]["ms_per_update"]
    graphs = {**study, "settings": {**study["settings"], "compile_mode": "reduce-overhead"}}
    for doc, kind in ((study, "compiled"), (graphs, "compiled:reduce-overhead")):
        done = plan(tmp_path, doc, "--gpus", "1", "--gpu-model", "NVIDIA H200")
        assert done.returncode == 0, done.stdout + done.stderr
        row = rows(done.stdout)["final"]
        assert f"{kind} figures" in " ".join(row) and "not measured" not in " ".join(row), row
        assert abs(float(row[5]) - 1_000_000 * m[kind]["full"] / 1000 / 3600) <= 0.005  # GPU-hours, 2 decimals
    # every method has a figure in that mode now: the fallback is tested on costs without LoRA's
    import harness.plan

    lora = {**graphs, "methods": {"lora": {"r": [8], "lr": [1.0e-3]}}}
    measured = harness.plan.load_costs()
    del measured["NVIDIA H200"]["vision"]["ms_per_update"]["compiled:reduce-overhead"]["lora"]
    monkeypatch.setattr(harness.plan, "load_costs", lambda *a, **k: measured)
    row = " ".join(rows(plan(tmp_path, lora, "--gpus", "1", "--gpu-model", "NVIDIA H200").stdout)["final"])
    assert "compiled figures for lora (compiled:reduce-overhead not measured)" in row, row


def test_trials_under_cuda_graphs_are_packed_at_the_graphs_measured_rate(tmp_path):
    """Four trials on one H200 train 1.23x one trial's rate in torch.compile's default mode but 0.94x under
    CUDA graphs (one replayed step already fills the GPU): a study's compile_mode picks its figure."""
    measured = COSTS["NVIDIA H200"]["packing"]
    default, graphs = measured["speedup"]["4"], measured["compiled:reduce-overhead"]["speedup"]["4"]
    assert graphs < 1.0 < default
    notes = {}
    for mode in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
        doc = dict(STUDY, settings={"compile_mode": mode})
        done = plan(tmp_path, doc, "--gpus", "2", "--gpu-model", "NVIDIA H200")
        assert done.returncode == 0, done.stdout + done.stderr
        notes[mode] = " ".join(rows(done.stdout)["select"][8:])
    assert f"4 trials per GPU at {default:.3g}x one trial's rate in all" in notes["default"]
    assert f"4 trials per GPU at {graphs:.3g}x one trial's rate in all (compiled:reduce-overhead" in notes["reduce-overhead"]
    # a mode with no packing measurement gets the default mode's figure, and the plan says so
    assert (f"4 trials per GPU at {default:.3g}x one trial's rate in all (torch.compile's default mode's figure; "
            "compiled:max-autotune-no-cudagraphs not measured)") in notes["max-autotune-no-cudagraphs"]

"""The engine written once: trials interleaved in one process match each alone, resolved settings name
the same row, records carry their provenance, waves come from method declarations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.finetune import FineTuneRun
from harness.trial import TrialSpec, resolve_trial
from harness.finetune import run_trial

VISION = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 2},
          "drop_path": 0.1, "weights": "random", "threads": 1}
RL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.1, "data_episodes": 2,
      "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 10, "pretrain_batch_size": 8,
      "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False,
      "eval_pretrained": False}
# what differs between two runs of the same trial: clocks and dates
TIMING = {"wall_time_s", "date", "peak_memory_mb", "ms_per_update"}
EXTRA_TIMING = {"train_wall_s", "train_steps_per_s", "total_wall_s", "eval_wall_s", "data_share", "started_at",
                "timing"}


# one cache for the module (tests/conftest.py): its trials share settings, so data and base are built once
pytestmark = pytest.mark.usefixtures("cache")


def comparable(record) -> dict:
    flat = {k: v for k, v in record.flat().items() if k not in TIMING | {"extra"}}
    flat["extra"] = {k: v for k, v in record.extra.items() if k not in EXTRA_TIMING}
    return flat


def specs(track: str) -> list[TrialSpec]:
    if track == "vision":
        budget = {"steps": 6, "batch_size": 8}
        return [TrialSpec("vision", "builtin", "shapes", "lora", {"r": 2}, 0, budget, VISION),
                TrialSpec("vision", "builtin", "textures", "full", {}, 1, budget, VISION)]
    budget = {"steps": 6, "batch_size": 8, "eval_episodes": 1, "report_every": 2}
    return [TrialSpec("rl", "cw10", "window-close", "lora", {"r": 2}, 0, budget, RL),
            TrialSpec("rl", "cw10", "window-close", "full", {}, 1, budget, RL)]


@pytest.mark.parametrize("track", ["vision", "rl"])
def test_two_trials_interleaved_in_one_process_match_each_alone(track):
    """Dropout and DropPath draw from torch's global generator: each trial must own its state of it."""
    first, second = specs(track)
    alone = [run_trial(s, lambda m: None) for s in (first, second)]
    assert all(r.status == "ok" for r in alone), [r.error for r in alone]
    sessions = [FineTuneRun(s, lambda m: None) for s in (first, second)]
    for s in sessions:
        s.start()
    stepping = list(sessions)
    while stepping:  # one update of each in turn
        stepping = [s for s in stepping if s.step()]
    together = [s.finish() for s in sessions]
    for a, b in zip(alone, together):
        assert comparable(a) == comparable(b)
    # and the two trials did differ from each other (the comparison can fail)
    assert alone[0].metrics != alone[1].metrics


def test_resolved_settings_name_the_same_trial():
    a = resolve_trial(TrialSpec("rl", "cw10", "hammer", "lora", {}, 0, {}, {}))
    b = resolve_trial(TrialSpec("rl", "cw10", "hammer", "lora", {"r": 8}, 0, {"steps": 100_000}, {}))
    assert a == b and a.method_settings["r"] == 8 and a.budget.eval_episodes == 10


def test_a_copy_without_git_records_the_commit_it_declares(tmp_path, monkeypatch):
    """Code copied to a GPU host without its .git records HARNESS_GIT_COMMIT (marked declared), else
    "unknown"; a checkout's own commit wins over the variable."""
    from harness import provenance

    copy = tmp_path / "copy"
    shutil.copytree(Path(provenance.__file__).parent, copy / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    probe = [sys.executable, "-c", "from harness.provenance import git_commit; print(git_commit())"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HARNESS_GIT_COMMIT")}
    run = lambda extra: subprocess.run(probe, cwd=copy, env={**env, **extra}, capture_output=True, text=True,
                                       check=True).stdout.strip()
    assert run({}) == "unknown"
    assert run({"HARNESS_GIT_COMMIT": "abc1234"}) == "abc1234 (declared)"
    monkeypatch.setenv("HARNESS_GIT_COMMIT", "abc1234")
    provenance.git_commit.cache_clear()
    try:
        assert "declared" not in provenance.git_commit()  # this checkout has its .git
    finally:
        provenance.git_commit.cache_clear()


def test_record_says_what_made_it():
    from harness import provenance

    record = run_trial(specs("vision")[0], lambda m: None)
    assert record.status == "ok", record.error
    software = record.software
    assert set(software) == {"torch", "peft", "timm", "ray", "metaworld", "mujoco", "gymnasium"}
    assert software["torch"] == __import__("torch").__version__
    assert record.git_commit == provenance.git_commit() and record.git_commit
    assert record.device_name.startswith("CPU")
    # the method's own costs: training alone (no GPU here, so no GPU memory)
    assert record.ms_per_update > 0 and record.train_peak_memory_mb == 0.0
    assert record.ms_per_update < 1000 * record.extra["train_wall_s"]  # steady updates only, warm-up left out
    assert record.settings == {"r": 2, "alpha": None, "dropout": 0.0, "rslora": False, "lr": None,
                                           "weight_decay": None, "targets": None}


def test_waves_follow_method_declarations():
    from harness.sweep_file import method_waves
    from harness.methods import get_method

    assert get_method("eigenlora").builds_on == ("lora",)
    assert method_waves(["eigenlora", "full", "lora"]) == [["full", "lora"], ["eigenlora"]]
    assert method_waves(["eigenlora", "full"]) == [["eigenlora", "full"]]  # its bank comes from earlier sweeps


def test_selection_follows_the_metric_direction():
    from harness.driver import choose_settings

    recs = [{"status": "ok", "method": "m", "task": "t", "settings": json.dumps({"lr": lr}), "loss": loss}
            for lr, loss in ((0.1, 2.0), (0.01, 1.0))]
    assert choose_settings(recs, "loss", higher_is_better=True)[("m", "t")] == {"lr": 0.1}
    assert choose_settings(recs, "loss", higher_is_better=False)[("m", "t")] == {"lr": 0.01}


def test_selection_prefers_trials_the_scheduler_kept_and_never_depends_on_finish_order():
    """Under ASHA a stopped trial's record carries its score at a rung (fewer updates): it loses to the
    trials that trained the whole budget even when its rung score is equal or higher, as in 5 of the 70
    groups of the cw10-short board, where a stopped trial tied the kept one and won on its settings' sort
    order. Ties among equals go to the same settings whatever order the records come in."""
    from harness.driver import choose_settings

    def rec(lr, success, stopped=None, seed=0):
        extra = {"updates": 3000} if stopped is None else {"stopped_at_update": stopped, "updates": stopped}
        return {"status": "ok", "method": "m", "task": "t", "settings": json.dumps({"lr": lr}), "seed": seed,
                "success": success, "extra": json.dumps(extra)}

    tie = [rec(1e-4, 0.7, stopped=750), rec(4e-4, 0.7)]
    higher_at_rung = [rec(1e-4, 0.9, stopped=750), rec(4e-4, 0.6)]
    for recs in (tie, higher_at_rung):
        for order in (recs, recs[::-1]):
            assert choose_settings(order, "success")[("m", "t")] == {"lr": 4e-4}
    # a setting with one seed stopped has not trained the whole budget on its seeds
    mixed = [rec(1e-4, 1.0), rec(1e-4, 1.0, stopped=750, seed=1), rec(4e-4, 0.5), rec(4e-4, 0.5, seed=1)]
    assert choose_settings(mixed, "success")[("m", "t")] == {"lr": 4e-4}
    # the full grid (no scheduler): the best mean wins; equal means always give the same settings
    grid = [rec(1e-4, 0.9), rec(2e-4, 0.9), rec(4e-4, 0.8)]
    choices = {json.dumps(choose_settings(order, "success")[("m", "t")])
               for order in (grid, grid[::-1], grid[1:] + grid[:1])}
    assert len(choices) == 1 and json.loads(choices.pop())["lr"] in (1e-4, 2e-4)


def test_equal_scores_are_decided_by_the_benchmarks_tiebreak_metric():
    """Success on 10 episodes ties often (on the H200, the four stick-pull LoRA points ASHA trained to the end
    all read 0.0): the benchmark's finer metric (RL: return, better in the same direction) decides between
    equal means before the settings' sort order does; a record without it ranks last."""
    from harness.driver import choose_settings

    def rec(lr, success, ret=None, seed=0):
        r = {"status": "ok", "method": "m", "task": "t", "settings": json.dumps({"lr": lr}), "seed": seed,
             "success": success}
        return r if ret is None else {**r, "return": ret}

    tied = [rec(1e-4, 0.0, 42.0), rec(4e-4, 0.0, 397.0), rec(1e-3, 0.0, 553.0)]
    for order in (tied, tied[::-1]):
        assert choose_settings(order, "success", tiebreak="return")[("m", "t")] == {"lr": 1e-3}
        assert choose_settings(order, "success")[("m", "t")] == {"lr": 1e-4}  # no tiebreak: the settings' order
    # the mean over seeds decides, as for the score; the primary metric still comes first
    seeds = [rec(1e-4, 0.5, 900.0), rec(1e-4, 0.5, 100.0, seed=1), rec(4e-4, 0.5, 600.0), rec(4e-4, 0.5, 600.0, 1),
             rec(1e-3, 0.6, 10.0)]
    assert choose_settings(seeds, "success", tiebreak="return")[("m", "t")] == {"lr": 1e-3}
    assert choose_settings(seeds[:4], "success", tiebreak="return")[("m", "t")] == {"lr": 4e-4}
    missing = [rec(1e-4, 0.5), rec(4e-4, 0.5, 1.0)]
    assert choose_settings(missing, "success", tiebreak="return")[("m", "t")] == {"lr": 4e-4}
    # lower is better: the lower tiebreak wins among equal scores
    low = [rec(1e-4, 0.3, 5.0), rec(4e-4, 0.3, 2.0)]
    assert choose_settings(low, "success", higher_is_better=False, tiebreak="return")[("m", "t")] == {"lr": 4e-4}


def test_trial_names_are_safe_folder_names():
    from dataclasses import asdict

    from harness.driver import _trial_name

    class Trial:
        config = {"spec": asdict(TrialSpec("rl", "cw10", "hammer", "eigenlora", {"bank_dir": "/data/../bank x"}, 2))}

    assert _trial_name(Trial) == "hammer_eigenlora_bank_dir_data_.._bank_x_s2"


def test_engine_runs_from_the_resolved_trial_alone(monkeypatch):
    """The engine takes a resolved trial as given: with the method's settings resolver, the track's
    settings and budget validation and the resolver of hand-made trials all refusing, a resolved trial
    (here through its Ray form, ``to_config`` -> ``from_config``) still runs to an ok record."""
    from harness import trial as trial_module
    from harness.methods.base import Method
    from harness.trial import TrialRecord
    from harness.tracks import Track
    from harness.trial import ResolvedTrial

    resolved = ResolvedTrial.from_config(resolve_trial(specs("vision")[0]).to_config())
    assert resolved.budget.steps == 6 and resolved.track_settings.img_size == 32 and resolved.method_settings["r"] == 2

    def refuse(*args, **kwargs):
        raise AssertionError("resolved again")

    monkeypatch.setattr(Method, "resolve_settings", refuse)
    monkeypatch.setattr(Track, "settings", refuse)
    monkeypatch.setattr(Track, "budget", refuse)
    monkeypatch.setattr(trial_module, "resolve_trial", refuse)
    run = FineTuneRun(resolved, lambda m: None)  # the trial's one life cycle
    run.start()
    while run.step():
        pass
    record = run.finish()
    assert isinstance(record, TrialRecord) and record.status == "ok", record.error
    assert record.trainable_params > 0 and record.metrics and record.targets == resolved.targets != ""
    assert record.settings["r"] == 2 and record.budget["steps"] == 6
    # one clock: the phases partition the trial's time, and the record's wall time is the same clock's
    timing = record.extra["timing"]
    phases = sum(v for k, v in timing.items() if k.endswith("_s") and k not in ("total_s", "process_to_trial_s"))
    assert phases == pytest.approx(timing["total_s"], abs=0.01)
    assert timing["total_s"] <= record.wall_time_s + 0.01 and record.extra["updates"] == 6


@pytest.mark.parametrize("track", ["vision", "rl"])
def test_one_lr_schedule_with_the_same_floor_on_both_tracks(track):
    """Issue 19, item 4: one schedule (harness.training.Schedule): warm-up, then a cosine to min_lr_ratio x
    the trial's own lr, on both tracks; a method's lr moves the floor with it."""
    from harness.finetune import FineTuneRun
    from harness.training import Schedule

    s = Schedule(steps=10, lr=1e-3, warmup=2)
    assert s.lr_at(0) == pytest.approx(5e-4) and s.lr_at(2) == pytest.approx(1e-3)
    assert s.lr_at(10) == pytest.approx(1e-5) and s.lr_at(6) == pytest.approx((1e-3 + 1e-5) / 2)
    spec = specs(track)[0]
    run = FineTuneRun(TrialSpec(spec.track, spec.benchmark, spec.task, "lora", {"r": 2, "lr": 2e-3}, 0,
                                spec.budget, spec.track_settings), lambda m: None)
    run.start()
    assert not run.failed, run.record.error
    loop = run.loop
    assert isinstance(loop, Schedule) and loop.lr == 2e-3 and loop.min_lr_ratio == 0.01
    assert loop.lr_at(loop.steps) == pytest.approx(2e-5)  # the floor follows the method's lr on either track


def test_a_record_crosses_the_ray_boundary_as_one_json_document():
    """Issue 19, item 2: the record is typed (settings, budget and versions are mappings) and serialised once
    where Ray needs it (``to_json``, nothing encoded twice); the results-table row keeps its file format
    (``settings`` and the other mappings as JSON text in their columns), and a row reads back as the record."""
    from harness.driver import _final_report
    from harness.trial import TrialRecord

    record = run_trial(specs("vision")[0], lambda m: None)
    assert record.status == "ok", record.error
    report = _final_report(record)
    payload = json.loads(report["record"])
    assert payload["settings"]["r"] == 2 and payload["budget"]["steps"] == record.budget["steps"]
    assert isinstance(payload["software"], dict) and isinstance(payload["extra"], dict)
    assert report["top1"] == record.metrics["top1"] and report["status"] == "ok"
    back = TrialRecord.from_json(report["record"])
    assert back == record
    row = record.flat()
    assert json.loads(row["settings"]) == record.settings and json.loads(row["software"]) == record.software
    assert row["top1"] == record.metrics["top1"] and list(row)[-1] == "extra"
    assert TrialRecord.from_row(row) == back
    # a row is also what an older worker reported under ``record``: read the same way (a resumed experiment)
    assert TrialRecord.from_json(json.dumps(row)).flat() == row


@pytest.mark.parametrize("track", ["vision", "rl"])
def test_the_compile_mode_reaches_the_trials_loop_and_is_checked(track):
    """Issue 21: ``compile_mode`` (reduce-overhead: the step as CUDA graphs) is a track setting that the
    trial's loop receives; the Trainer compiles on CUDA only, so here the step stays eager. A mode without
    ``compile`` and a mode torch does not have are refused."""
    from harness.errors import ConfigError
    from harness.training import compiled_loss

    spec = specs(track)[0]
    ts = {**spec.track_settings, "compile": True, "compile_mode": "reduce-overhead"}
    run = FineTuneRun(TrialSpec(spec.track, spec.benchmark, spec.task, "lora", {"r": 2}, 0, spec.budget, ts),
                      lambda m: None)
    run.start()
    assert not run.failed, run.record.error
    assert run.loop.compile and run.loop.compile_mode == "reduce-overhead"
    assert run.trainer.compute_loss == run.trainer._loss  # a CPU trial: not compiled whatever the mode
    bad = FineTuneRun(TrialSpec(spec.track, spec.benchmark, spec.task, "lora", {"r": 2}, 0, spec.budget,
                                {**spec.track_settings, "compile": False, "compile_mode": "reduce-overhead"}),
                      lambda m: None)
    bad.start()
    assert bad.failed and "compile_mode" in bad.record.error and "compile: true" in bad.record.error
    with pytest.raises(ConfigError, match="'fast'.*expected one of.*reduce-overhead"):
        compiled_loss(lambda batch: batch, "fast")


def test_compiled_steps_get_the_harness_inductor_defaults_under_every_mode_and_an_explicit_setting_wins(monkeypatch):
    """Compiled steps split inductor's mixed-order LayerNorm backward (``INDUCTOR_DEFAULTS``: faster on the
    H200, BENCHMARKS.md) on top of their mode's own options; a caller's ``inductor`` settings win; a
    default this torch lacks is left out; a setting torch does not have is refused, naming it."""
    import torch
    import torch._inductor.config as inductor_config

    from harness import training
    from harness.errors import ConfigError

    graphs = training.inductor_options("reduce-overhead")
    assert graphs["triton.cudagraphs"] is True and graphs["triton.mix_order_reduction"] is False
    assert training.inductor_options("default") == {"triton.mix_order_reduction": False}
    tuned = training.inductor_options("max-autotune-no-cudagraphs", {"triton.mix_order_reduction": True})
    assert tuned["max_autotune"] is True and tuned["triton.mix_order_reduction"] is True
    torch.compile(lambda x: x, options=graphs)  # torch checks the options' names here, before any call
    monkeypatch.setitem(training.INDUCTOR_DEFAULTS, "triton.no_such_setting", 1)
    assert "triton.no_such_setting" not in training.inductor_options("default")
    assert "triton.no_such_setting" not in inductor_config.get_config_copy()
    with pytest.raises(ConfigError, match="'triton.mix_order_reductio' is not in this torch"):
        training.inductor_options("default", {"triton.mix_order_reductio": False})

"""Issue 18: the return-target rule (``return_target``) and ``python -m harness eval rl --pretrained FILE``,
an exported base scored without pretraining. Rules on made-up episodes; the command on a tiny DT exported
by the test (real Meta-World rollouts, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.errors import ConfigError
from harness.tracks import get_track

track = get_track("rl")

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.1, "data_episodes": 2,
        "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 30, "pretrain_batch_size": 16,
        "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False}


# --- the rules ---------------------------------------------------------------------------------------------

def made_up_episodes():
    """Five episodes of 3 steps; returns 10, 40, 20, 100, 30; the last step a success in episodes 0, 2 and 4
    (episode 3, the best return, reaches success and loses it: the case ``max`` cannot tell apart)."""
    from agents.data import Episodes

    E, T = 5, 3
    rewards = np.zeros((E, T), np.float32)
    rewards[:, 0] = [10, 40, 20, 100, 30]
    successes = np.zeros((E, T), bool)
    successes[[0, 2, 4], -1] = True
    successes[3, 1] = True
    return Episodes(np.zeros((E, T, 39), np.float32), np.zeros((E, T, 4), np.float32), rewards,
                    np.zeros((E, T), bool), successes, np.zeros(E, np.float32))


@pytest.mark.parametrize("rule,value,pool,fallback", [
    ("max", 100.0, 5, False),
    ("mean", 40.0, 5, False),
    ("quantile:0.5", 30.0, 5, False),
    ("quantile:0.25", 20.0, 5, False),
    ("quantile:1", 100.0, 5, False),
    ("success_max", 30.0, 3, False),
    ("success_mean", 20.0, 3, False),
    ("success_quantile:0.75", 25.0, 3, False),  # numpy's linear interpolation between 20 and 30
])
def test_each_rule_on_made_up_episodes(rule, value, pool, fallback):
    from agents.return_targets import return_target

    got = return_target(made_up_episodes(), rule)
    assert (got.value, got.episodes, got.fallback, got.rule) == (pytest.approx(value), pool, fallback, rule)


def test_success_rules_fall_back_to_max_without_a_successful_episode():
    from agents.return_targets import target_from

    returns, none = np.array([5.0, 50.0, 7.0]), np.zeros(3, bool)
    for rule in ("success_max", "success_mean", "success_quantile:0.1"):
        got = target_from(returns, none, rule)
        assert (got.value, got.fallback, got.episodes) == (50.0, True, 3)
    assert target_from(returns, np.array([True, False, False]), "success_mean").value == 5.0


def test_rules_are_spelled_canonically_and_bad_ones_refused():
    from agents.return_targets import canonical_rule

    assert canonical_rule(" quantile:0.90") == "quantile:0.9" and canonical_rule("success_max") == "success_max"
    assert track.settings({"return_target": "success_quantile:.5"}).return_target == "success_quantile:0.5"
    for bad, says in (("median", "unknown return-target rule"), ("quantile", "needs its quantile"),
                      ("quantile:1.5", "outside \\[0, 1\\]"), ("quantile:x", "not a number"),
                      ("max:0.5", "only quantile rules"), ("success_quantile:nan", "outside")):
        with pytest.raises(ConfigError, match=f"'return_target'.*{says}.*success_max"):
            track.settings({"return_target": bad})


def test_the_recipe_conditions_on_successful_episodes_and_the_paper_preset_on_the_best_return(cache):
    from agents.data import load_dataset
    from agents.track import data_settings, task_target

    ts = track.settings(TINY)
    assert ts.return_target == "success_mean"
    data = load_dataset("reach", data_settings(ts))
    got = task_target(ts, "reach")
    last = data.successes[:, -1]
    assert got.rule == "success_mean" and got.fallback == (not last.any())
    returns = data.returns.astype(np.float64)  # the rule averages in float64
    assert got.value == float(returns[last].mean() if last.any() else returns.max())
    paper = track.settings({**TINY, "preset": "paper"})  # the keys TINY sets win over the preset's
    got = task_target(paper, "reach")
    assert got.value == float(data.returns.max()) and got.rule == "max" and not got.fallback  # bit for bit
    assert got.facts()["target_return"] == float(data.returns.max())


# --- a trial records its rule, and scores its base under the same target ------------------------------------

@pytest.mark.filterwarnings("ignore")
def test_a_trial_conditions_on_the_rules_target_and_records_it(cache):
    from agents.data import load_dataset
    from agents.return_targets import return_target
    from agents.track import data_settings
    from harness.finetune import run_trial
    from harness.trial import TrialSpec

    settings = {**TINY, "return_target": "quantile:0"}  # the worst episode's return: unlike max
    data = load_dataset("reach", data_settings(track.settings(settings)))
    assert data.returns.min() < data.returns.max()
    spec = TrialSpec(track="rl", benchmark="mt40", task="reach", method="linear", seed=0,
                     budget={"steps": 2, "eval_episodes": 1, "batch_size": 4, "report_every": 1},
                     track_settings=settings)
    record = run_trial(spec, lambda m: None)
    assert record.status == "ok", record.error
    assert record.extra["return_target"] == "quantile:0" and record.extra["target_fallback"] is False
    assert record.extra["target_return"] == pytest.approx(float(data.returns.min()))
    assert record.extra["target_return"] == return_target(data, "quantile:0").value
    assert record.backbone.endswith("; return target quantile:0]")  # never one row with the recipe's or the papers'


# --- python -m harness eval rl -------------------------------------------------------------------------------

@pytest.fixture()
def base_file(cache, tmp_path):
    out = track.pretrain(track.settings(TINY), export=str(tmp_path / "tiny.safetensors"))
    return tmp_path / "tiny.safetensors", out


def _main(argv: list[str]) -> int:
    from harness.cli import main

    return main(argv)


@pytest.mark.filterwarnings("ignore")
def test_eval_scores_an_exported_base_without_pretraining(base_file, tmp_path, monkeypatch, capsys):
    import agents.track as rl
    from agents.data import load_dataset
    from agents.pretrain import load_model
    from agents.rollout import evaluate_dt
    from agents.track import data_settings, model_config

    path, exported = base_file

    def no_pretraining(*args, **kwargs):
        raise AssertionError("eval must not pretrain")

    monkeypatch.setattr(rl, "build_pretrained", no_pretraining)
    out = tmp_path / "res" / "eval.json"
    rc = _main(["eval", "rl", "--pretrained", str(path), "--set", "eval_episodes=2", "--set", "eval_workers=1",
                "--set", "tasks=[reach, window-close]", "--set", "device=cpu", "--set", "return_target=mean",
                "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["base_key"] == exported["base_key"] and result["return_target"] == "mean"
    # the JSON says what made it, as a bench's does
    assert result["command"].startswith(f"python -m harness eval rl --pretrained {path} --set eval_episodes=2")
    assert result["device"] == "cpu" and result["git_commit"] and result["software"]["torch"]
    assert list(result["tasks"]) == ["reach", "window-close"] and result["eval_episodes"] == 2
    ts = track.settings(TINY)
    model = load_model(path, model_config(ts))
    for task, r in result["tasks"].items():
        data = load_dataset(task, data_settings(ts))  # the file's own data settings: the same cache entry
        assert r["target"] == pytest.approx(float(data.returns.astype(np.float64).mean()))
        # the batched evaluation scores what one task alone scores, at that target
        alone = evaluate_dt(model, task, 2, r["target"], 1, 0)
        assert r["return"] == pytest.approx(alone.return_mean, rel=1e-5)
        assert (r["success"], r["success_any"]) == (alone.success, alone.success_any)
        assert f"| {task} | {r['success']:.3f} | {r['success_any']:.3f} |" in printed
    assert result["mean"]["return"] == pytest.approx(np.mean([r["return"] for r in result["tasks"].values()]))
    assert "return target rule mean" in printed and "| mean of 2 |" in printed


@pytest.mark.filterwarnings("ignore")
def test_eval_refuses_bad_input_before_compute(base_file, tmp_path, monkeypatch, capsys):
    import agents.evaluation as ev

    path, _ = base_file

    def no_compute(*args, **kwargs):
        raise AssertionError("bad input must be refused before any rollout")

    monkeypatch.setattr(ev, "pretrained_evals", no_compute)
    monkeypatch.setattr(ev, "task_targets", no_compute)
    cases = [
        (["--set", "n_embd=64"], "'n_embd'.*come from the base file.*eval_episodes"),
        (["--set", "data_episodes=5"], "'data_episodes'.*come from the base file"),
        (["--set", "episodes=5"], "unknown eval key.*'episodes'.*eval_episodes"),
        (["--set", "eval_episodes=0"], "'eval_episodes'=0"),
        (["--set", "return_target=best"], "'return_target'='best'.*success_max"),
        (["--set", "tasks=[reach, fly]"], "'fly'.*reach"),
        (["--set", "tasks=[]"], "'tasks'"),
    ]
    for extra, says in cases:
        assert _main(["eval", "rl", "--pretrained", str(path), *extra]) == 2, extra
        assert __import__("re").search(says, capsys.readouterr().err, __import__("re").S), (extra, says)
    assert _main(["eval", "rl", "--pretrained", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert _main(["eval", "vision", "--pretrained", str(path)]) == 2
    assert "rl track" in capsys.readouterr().err


def test_eval_refuses_a_file_whose_data_this_harness_cannot_rebuild(base_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from agents.evaluation import eval_settings

    path, _ = base_file
    with safe_open(str(path), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    data = json.loads(meta["data"])
    # the same tensors (their digest still holds), data made by an expert this version does not have
    other = tmp_path / "other-expert.safetensors"
    save_file(state, str(other), metadata={**meta, "data": json.dumps({**data, "policy": "someone-elses-v9"})})
    with pytest.raises(ConfigError, match="someone-elses-v9.*does not make"):
        eval_settings(other)
    longer = tmp_path / "longer.safetensors"
    save_file(state, str(longer), metadata={**meta, "data": json.dumps({**data, "episode_length": 500})})
    with pytest.raises(ConfigError, match="500 steps"):
        eval_settings(longer)
    ts, ev, base = eval_settings(path, {"return_target": "success_max"})
    assert (ts.data_episodes, ts.noise_levels, ts.n_embd, ts.pretrain_tasks) == (2, [0.0, 0.5], 32, ["reach"])
    assert ts.return_target == ev.return_target == "success_max" and ts.pretrained == str(path)
    assert Path(base.path) == path


@pytest.mark.filterwarnings("ignore")
def test_the_pretraining_curve_scores_under_the_rule_and_says_so(tmp_path, monkeypatch):
    from agents.data import load_dataset
    from agents.pretrain import load_model
    from agents.rollout import evaluate_dt
    from agents.track import data_settings, model_config

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # a fresh pretraining: its curve is scored now
    settings = track.settings({**TINY, "pretrain_steps": 10, "pretrain_eval_episodes": 1,
                               "return_target": "success_mean"})
    out = track.pretrain(settings, curve=str(tmp_path / "curve.json"))
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert doc["return_target"] == "success_mean" and [p["return_target"] for p in doc["points"]] == ["success_mean"]
    data = load_dataset("reach", data_settings(settings))
    won = data.successes[:, -1]
    target = float(data.returns[won].astype(np.float64).mean()) if won.any() else float(data.returns.max())
    alone = evaluate_dt(load_model(out["path"], model_config(settings)), "reach", 1, target, 1, 0)
    assert doc["points"][-1]["tasks"]["reach"]["return"] == pytest.approx(alone.return_mean, rel=1e-5)


def test_targets_of_many_tasks_build_their_missing_data_in_one_pool(cache, monkeypatch):
    """A fresh cache's 40 MT40 datasets were built one task at a time (about five minutes on an H200 host):
    ``task_targets`` builds every missing one in one call (one process pool), then reads each."""
    import agents.track as rl

    calls = []
    real = rl.build_datasets
    monkeypatch.setattr(rl, "build_datasets", lambda tasks, *a, **k: calls.append(list(tasks)) or real(tasks, *a, **k))
    ts = track.settings(TINY)
    got = rl.task_targets(ts, ["reach", "window-close"])
    assert calls[0] == ["reach", "window-close"] and list(got) == ["reach", "window-close"]
    assert got["window-close"] == rl.task_target(ts, "window-close")

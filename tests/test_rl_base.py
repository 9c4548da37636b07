"""The RL base: experts that hold success, the data report, the expert ceiling on trial records, the
time-to-quality pretraining curve (and its resume), and shareable base files. Real Meta-World, tiny DTs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import ConfigError
from harness.tracks import get_track

track = get_track("rl")

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.1, "data_episodes": 2,
        "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 30, "pretrain_batch_size": 16,
        "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False}


# --- experts ---------------------------------------------------------------------------------------------

def _episode(task: str, hold, seed: int = 0) -> tuple[bool, bool]:
    """(last-step, any-step) success of one noise-free expert episode."""
    from agents.tasks import Expert, make_env

    env = make_env(task, seed=seed)
    expert = Expert(task, env, hold)
    obs, _ = env.reset()
    seen = False
    for _ in range(200):
        obs, _, _, _, info = env.step(np.clip(expert.act(obs), -1, 1).astype(np.float32))
        expert.observe(obs, bool(info["success"]))
        seen |= bool(info["success"])
    return bool(info["success"]), seen


@pytest.mark.filterwarnings("ignore")
def test_hold_keeps_the_success_the_scripted_policy_loses():
    # faucet-open: metaworld's policy turns the handle on past the goal (0/4 last-step in our measurements)
    assert _episode("faucet-open", None) == (False, True)
    assert _episode("faucet-open", "stop") == (True, True)


@pytest.mark.filterwarnings("ignore")
def test_open_gripper_rule_and_modes():
    from agents.tasks import Expert, make_env

    env = make_env("reach", seed=0)
    obs, _ = env.reset()
    assert Expert("reach", env, None).act(obs)[3] == 0.0  # reach's policy sends grab effort 0
    assert Expert("reach", env, "stop").act(obs)[3] == -1.0  # the rule opens the gripper
    with pytest.raises(ConfigError, match="freeze"):
        Expert("reach", env, "hover")


def test_data_key_names_the_expert():
    from agents.data import DataSettings

    old = DataSettings(expert="scripted").key("reach")
    assert old["policy"] == "metaworld-scripted-v3"  # the data before the rule keeps its cache entries
    new = DataSettings().key("reach")
    assert new != old and "hold" in new["policy"]
    with pytest.raises(ConfigError, match="scripted"):
        DataSettings(expert="random")
    with pytest.raises(ConfigError, match="expert"):
        track.settings({"expert": "random"})


@pytest.mark.filterwarnings("ignore")
def test_calibration_and_report(cache, tmp_path):
    from agents.data import (EXPERT_KIND, DataSettings, _expert_key, data_report, expert_hold, format_report,
                             write_report)

    settings = DataSettings(episodes=2, noise_levels=(0.0, 0.5), seed=1)
    report = data_report(["reach"], settings, workers=1, cache=cache)
    calib = expert_hold("reach", cache=cache)
    assert cache.lookup(EXPERT_KIND, "reach", _expert_key("reach", 200)) is not None  # measured once, cached
    assert calib["mode"] in ("stop", "freeze") and set(calib["modes"]) == {"stop", "freeze"}
    assert calib["holds_success"] is True
    rows = report["rows"]
    assert [r["noise"] for r in rows] == [0.0, 0.5] and all(r["episodes"] == 1 for r in rows)
    assert rows[0]["success_last"] == 1.0 and rows[0]["hold"] == calib["mode"]
    assert rows[0]["return_min"] <= rows[0]["return_mean"] <= rows[0]["return_max"]
    json_path, csv_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["rows"] == rows
    assert csv_path.read_text().splitlines()[0].startswith("task,set,noise,episodes,success_last")
    assert "| reach | MT40 |" in format_report(report)


# --- the time-to-quality curve -----------------------------------------------------------------------------

def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.filterwarnings("ignore")
def test_curve_survives_a_killed_call_and_resumes_exactly(tmp_path, monkeypatch):
    import agents.pretrain as pretrain_module

    settings = {**TINY, "pretrain_eval_at": [10, 20], "pretrain_eval_episodes": 1}
    # an uninterrupted run, for reference
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "a"))
    whole = track.pretrain(track.settings(settings), curve=str(tmp_path / "a.json"))
    ref = json.loads((tmp_path / "a.json").read_text())
    assert [p["updates"] for p in ref["points"]] == [10, 20, 30] and ref["complete"] is True
    assert all(0 <= p["success"] <= p["success_any"] <= 1 for p in ref["points"])
    assert ref["points"][0]["wall_s"] < ref["points"][1]["wall_s"] < ref["points"][2]["wall_s"]
    assert ref["points"][0]["data_s"] > 0 and set(ref["points"][0]["tasks"]) == {"reach"}
    # the last point is the finished model's MT40 evaluation: reported as such, not rolled out again
    assert whole["eval"]["tasks"]["reach"]["pretrained"]["return"] == ref["points"][-1]["tasks"]["reach"]["return"]

    # the same run, killed while scoring update 20
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "b"))
    real = pretrain_module._curve_point

    def killed_at_20(model, pools, targets, device, updates, *rest):
        if updates == 20:
            raise KeyboardInterrupt
        return real(model, pools, targets, device, updates, *rest)

    monkeypatch.setattr(pretrain_module, "_curve_point", killed_at_20)
    with pytest.raises(KeyboardInterrupt):
        track.pretrain(track.settings(settings), curve=str(tmp_path / "b.json"))
    partial = json.loads((tmp_path / "b.json").read_text())
    assert [p["updates"] for p in partial["points"]] == [10] and partial["complete"] is False
    monkeypatch.setattr(pretrain_module, "_curve_point", real)
    again = track.pretrain(track.settings(settings), curve=str(tmp_path / "b.json"))
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert [p["updates"] for p in resumed["points"]] == [10, 20, 30]
    assert [p["calls"] for p in resumed["points"]] == [1, 2, 2]
    # same batches and dropout after the restart: the same weights and scores as the uninterrupted run
    a, b = _weights(whole["path"]), _weights(again["path"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p["success_any"] for p in resumed["points"]] == [p["success_any"] for p in ref["points"]]


def test_a_deterministic_study_pretrains_its_base_under_deterministic_kernels(cache):
    """On a GPU a base pretrained afresh differed between runs (atomic-add backwards) and with it every record
    of a sweep on an empty cache; ``deterministic`` now covers the pretraining, its key unchanged (a cached
    base stays valid), and the process's own choice comes back afterwards."""
    from agents.pretrain import pretrain
    from agents.track import pretrain_plan

    seen: list[bool] = []
    ts = track.settings({**TINY, "deterministic": True})
    plan = pretrain_plan(ts)
    assert plan.train.deterministic and plan.base_key() == pretrain_plan(track.settings(TINY)).base_key()
    # an earlier deterministic trial in this test process leaves the process's choice on (it is the process's)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        pretrain(plan, torch.device("cpu"), 1,
                 log=lambda line: seen.append(torch.are_deterministic_algorithms_enabled()) if " update " in line else None)
        assert seen and all(seen)  # every progress line the training loop logged
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_curve_points_are_checked():
    with pytest.raises(ConfigError, match="pretrain_eval_at"):
        track.pretrain(track.settings({**TINY, "pretrain_eval_at": [50]}))
    with pytest.raises(ConfigError, match="pretrain_eval_at"):
        track.settings({"pretrain_eval_at": [0]})
    assert track.settings({"pretrain_eval_at": [20, 10, 20]}).pretrain_eval_at == [10, 20]


# --- shareable bases ---------------------------------------------------------------------------------------

@pytest.fixture()
def base_file(cache, tmp_path):
    out = track.pretrain(track.settings(TINY), export=str(tmp_path / "base.safetensors"))
    return tmp_path / "base.safetensors", out


def test_export_holds_weights_settings_and_checksum(base_file):
    from safetensors import safe_open

    from agents.track import check_pretrained
    from harness.cache import file_sha256

    path, out = base_file
    assert out["export"]["sha256"] == file_sha256(path)
    assert (path.parent / "base.safetensors.sha256").read_text().split() == [file_sha256(path), "base.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["base_key"] == out["base_key"] and json.loads(meta["model"])["n_embd"] == 32
    assert json.loads(meta["tasks"]) == ["reach"] and json.loads(meta["train"])["steps"] == 30
    cached = _weights(out["path"])
    assert set(weights) == set(cached) and all(torch.equal(weights[k], cached[k]) for k in cached)
    base = check_pretrained({**TINY, "pretrained": str(path)})
    assert base.base_key == out["base_key"] and base.label == f"base.safetensors@{file_sha256(path)[:8]}"
    assert check_pretrained(TINY) is None


def test_bad_base_files_are_refused_before_compute(base_file, tmp_path):
    from agents.track import check_pretrained

    path, _ = base_file
    with pytest.raises(ConfigError, match="pretrained.*no such file"):
        check_pretrained({**TINY, "pretrained": str(tmp_path / "none.safetensors")})
    with pytest.raises(ConfigError, match="n_embd: file 32, settings 64"):
        check_pretrained({**TINY, "n_embd": 64, "pretrained": str(path)})
    with pytest.raises(ConfigError, match="context: file 4, settings 8"):
        check_pretrained({**TINY, "context": 8, "pretrained": str(path)})
    # how a run trains, not what the weights are: dropout and the residual stream's dtype
    assert check_pretrained({**TINY, "dropout": 0.3, "pretrained": str(path)}) is not None
    assert check_pretrained({**TINY, "residual_dtype": "bfloat16", "pretrained": str(path)}) is not None
    # one changed byte near the end (tensor data): the checksum file no longer matches
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(bytes(data))
    (tmp_path / "changed.safetensors.sha256").write_text((path.parent / "base.safetensors.sha256").read_text())
    with pytest.raises(ConfigError, match="checksum mismatch"):
        check_pretrained({**TINY, "pretrained": str(changed)})
    # without a checksum file, the digest of the tensors in the metadata still catches it
    (tmp_path / "changed.safetensors.sha256").unlink()
    with pytest.raises(ConfigError, match="do not match the digest"):
        check_pretrained({**TINY, "pretrained": str(changed)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        check_pretrained({**TINY, "pretrained": str(cut)})
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ConfigError, match="not a harness DT base"):
        check_pretrained({**TINY, "pretrained": str(other)})


@pytest.mark.filterwarnings("ignore")
def test_trial_from_a_base_file_carries_its_name_and_the_expert_ceiling(base_file, monkeypatch):
    import agents.track as rl
    from harness.leaderboard import aggregate
    from harness.trial import TrialSpec
    from harness.finetune import run_trial

    path, out = base_file

    def no_pretraining(*args, **kwargs):
        raise AssertionError("a study with a base file must not pretrain")

    monkeypatch.setattr(rl, "build_pretrained", no_pretraining)
    settings = {**TINY, "pretrained": str(path), "pretrain_tasks": ["window-open"]}  # pretrain_* unused
    prepared = track.prepare(track.settings(settings), "cw10", ["window-close"], None)
    assert prepared["base_key"] == out["base_key"]
    spec = TrialSpec(track="rl", benchmark="cw10", task="window-close", method="lora", seed=0,
                     budget={"steps": 10, "eval_episodes": 2, "batch_size": 8, "report_every": 5},
                     track_settings=settings)
    record = run_trial(spec, lambda m: None)
    assert record.status == "ok", record.error
    assert record.backbone.endswith(f"[{out['export']['label']}; return target success_mean]")
    assert record.extra["base_key"] == out["base_key"] and record.extra["pretrained_file"] == out["export"]["label"]
    m = record.metrics
    assert 0 <= m["expert_success"] <= m["expert_success_any"] <= 1 and m["expert_success_any"] == 1.0
    row = aggregate([record.flat()], "success", {}).iloc[0]
    assert row["expert_success_mean"] == m["expert_success"] and out["export"]["label"] in row["backbone"]


@pytest.mark.filterwarnings("ignore")
def test_batched_mt40_eval_scores_the_same_episodes_as_one_task_at_a_time(cache):
    from agents.pretrain import load_model
    from agents.rollout import evaluate_dt
    from agents.track import base_model, model_config, pretraining_eval, task_target

    settings = track.settings({**TINY, "pretrain_tasks": ["reach", "window-close"], "pretrain_steps": 5,
                               "pretrain_eval_episodes": 1})
    both = pretraining_eval(settings)["tasks"]
    pre = base_model(settings)
    model = load_model(pre.path, model_config(settings))
    for task in ("reach", "window-close"):
        target = task_target(settings, task).value
        alone = evaluate_dt(model, task, 1, target, 1, 0)
        assert both[task]["pretrained"]["return"] == pytest.approx(alone.return_mean, rel=1e-5)


def test_presets_fill_only_the_keys_a_sweep_leaves_out():
    """`preset: recipe` (the default) is the measured base; `paper` the papers' pretraining; keys a sweep
    file sets win over both, and an unknown preset is refused with the valid names."""
    from agents.track import PRESETS, RLSettings, backbone_name
    from agents.pretrain import Pretrained

    recipe, paper = RLSettings(), RLSettings(preset="paper")
    assert (recipe.pretrain_steps, recipe.pretrain_lr, recipe.dropout) == (90_000, 3e-4, 0.1)
    assert {k: getattr(paper, k) for k in PRESETS["paper"]} == PRESETS["paper"]
    assert RLSettings(preset="paper", pretrain_steps=5).pretrain_steps == 5
    assert RLSettings(preset="paper", pretrain_steps=5).pretrain_lr == 1e-4
    with pytest.raises(ConfigError, match="recipe.*paper"):
        track.settings({"preset": "papers"})
    # two bases never share a leaderboard row: the backbone column names the base
    shape = "DecisionTransformer(layers=4, heads=8, width=512, context=50)"
    # the recipe's return target is named (rows scored under the papers' max, older ones included, name none)
    assert recipe.return_target == "success_mean" and paper.return_target == "max"
    assert (backbone_name(recipe, Pretrained(Path("m.pt"), "aaaa", {}))
            == f"{shape} [base aaaa; return target success_mean]")
    assert backbone_name(paper, Pretrained(Path("m.pt"), "bbbb", {})) == f"{shape} [base bbbb]"
    assert (backbone_name(RLSettings(return_target="max"), Pretrained(Path("m.pt"), "aaaa", {}))
            == f"{shape} [base aaaa]")


def test_pretraining_takes_its_own_compile_mode_outside_the_key(cache):
    """Pretraining ran torch's default mode whatever the settings said; `pretrain_compile_mode` (like
    ``pretrain_lr`` beside ``lr``) now sets its mode, outside the key (as ``compile``: how the updates run, not
    what they compute), and the base's info says how its updates ran ("" on a CPU, where nothing is compiled).
    Trials' ``compile_mode`` leaves pretraining alone, and a mode without ``compile`` is refused."""
    from agents.pretrain import pretrain
    from agents.track import pretrain_plan

    graphs = pretrain_plan(track.settings({**TINY, "compile": True, "pretrain_compile_mode": "reduce-overhead"}))
    assert graphs.train.compile_mode == "reduce-overhead"
    trials_only = track.settings({**TINY, "compile": True, "compile_mode": "reduce-overhead"})
    assert pretrain_plan(trials_only).train.compile_mode == "default"
    assert graphs.base_key() == pretrain_plan(track.settings({**TINY, "compile": True})).base_key()
    with pytest.raises(ConfigError, match="pretrain_compile_mode"):
        track.settings({**TINY, "compile": False, "pretrain_compile_mode": "reduce-overhead"})
    assert pretrain(graphs, torch.device("cpu"), 1).info["compile_mode"] == ""

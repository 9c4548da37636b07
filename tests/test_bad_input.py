"""Bad sweep files as a user writes them: `python -m harness sweep FILE` from the user's own working folder
exits 2 before Ray starts, naming the key and the value, and leaves nothing behind that would block the
corrected command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from harness import driver
from harness.cli import main

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "data_episodes": 2,
        "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 10, "pretrain_batch_size": 8,
        "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False}


def tiny(**over) -> dict:
    doc = {"name": "tiny", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"lora": {"r": 2}}, "seeds": [0], "budget": {"steps": 4, "eval_episodes": 1, "batch_size": 8},
           "settings": dict(TINY), "resources": {"gpus_per_trial": 0}}
    doc.update(over)
    return doc


@pytest.fixture()
def user_folder(tmp_path, monkeypatch):
    """The user's working folder (relative default --results and --leaderboard), with a tripwire on Ray."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))

    def ray_started(*a, **k):
        raise AssertionError("Ray was started for a sweep file that should have been refused")

    monkeypatch.setattr(driver, "init_ray", ray_started)
    return tmp_path


def sweep_exits_2(text: str, capsys) -> str:
    Path("s.yaml").write_text(text)
    assert main(["sweep", "s.yaml", "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not Path("results").exists() and not Path("leaderboard").exists(), "a refused sweep wrote files"
    return err


@pytest.mark.parametrize("over, expected", [
    ({"seeds": [0, 1, 1]}, r"seeds'=\[0, 1, 1\]: seeds must be distinct; repeated: 1"),
    ({"seeds": [0, 0]}, r"seeds must be distinct; repeated: 0"),
    ({"tasks": ["window-close", "window-close"]}, r"tasks must be distinct; repeated: window-close"),
    ({"tasks": []}, r"'tasks'=\[\]: list should have at least 1 item"),
    ({"seeds": []}, r"'seeds'=\[\]: list should have at least 1 item"),
    ({"seeds": [2**70]}, r"'seeds.0'=1180591620717411303424: must be <= 2147483647"),
    ({"seeds": [-1]}, r"'seeds.0'=-1: must be >= 0"),
    ({"methods": {"lora": {"r": 2, "lr": float("inf")}}}, r"methods.lora: .*'lr'=inf: expected a finite number"),
    ({"settings": {**TINY, "pretrain_lr": float("nan")}}, r"'pretrain_lr'=nan: (must be > 0|expected a finite number)"),
    ({"budgt": {"steps": 4}}, r"unknown key\(s\) \['budgt'\] \(did you mean 'budget'\?\)"),
    ({"selection": {"scheduler": "asha"}}, r"selection.scheduler='asha': only protocol 'select-then-final'"),
])
def test_bad_values_exit_2_before_ray_naming_key_and_value(user_folder, capsys, over, expected):
    err = sweep_exits_2(yaml.safe_dump(tiny(**over)), capsys)
    assert re.search(expected, err), err


def test_repeated_yaml_keys_are_refused_not_resolved_silently(user_folder, capsys):
    text = yaml.safe_dump(tiny()) + "seeds: [1]\n"  # a second seeds: below the first
    err = sweep_exits_2(text, capsys)
    assert "key 'seeds' appears twice" in err and "keep one" in err
    text = yaml.safe_dump(tiny(methods={})).replace("methods: {}", "methods:\n  linear: {}\n  linear: {lr: 0.1}")
    assert "key 'linear' appears twice" in sweep_exits_2(text, capsys)


def test_an_alias_bomb_is_refused_quickly_with_a_short_message(user_folder, capsys):
    lines = ["a0: &a0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(tiny()).replace("seeds:\n- 0\n", "seeds: *a8\n")
    err = sweep_exits_2(text, capsys)
    assert "expands to more than 100,000 values" in err and len(err) < 1000


def test_a_grid_past_ten_thousand_trials_states_its_count_and_needs_yes(user_folder, capsys):
    doc = tiny(methods={"lora": {"r": 2, "lr": [1e-5 * (i + 1) for i in range(120)]},
                        "full": {"lr": [1e-5 * (i + 1) for i in range(1000)]}}, seeds=list(range(10)))
    err = sweep_exits_2(yaml.safe_dump(doc), capsys)
    assert "11,200 trials" in err and "--yes" in err


def test_a_missing_data_root_fails_before_ray_and_does_not_block_the_fixed_command(user_folder, capsys):
    doc = {"name": "vt", "track": "vision", "benchmark": "vtab1k", "tasks": ["dtd"], "methods": {"linear": {}},
           "seeds": [0], "settings": {"data_root": "no/such/folder", "backbone": "vit_tiny_patch16_224",
                                      "weights": "random", "device": "cpu"}}
    err = sweep_exits_2(yaml.safe_dump(doc), capsys)
    assert "no/such/folder" in err and "does not exist" in err
    Path("vtab/dtd").mkdir(parents=True)  # a root, but not NOAH's layout
    doc["settings"]["data_root"] = "vtab"
    err = sweep_exits_2(yaml.safe_dump(doc), capsys)
    assert "train800" in err or "list file" in err, err


def test_a_missing_or_altered_base_file_fails_before_ray(user_folder, capsys):
    doc = tiny(settings={**TINY, "pretrained": "no-such-base.safetensors"})
    err = sweep_exits_2(yaml.safe_dump(doc), capsys)
    assert "pretrained" in err and "no-such-base.safetensors" in err
    Path("fake.safetensors").write_bytes(b"not a safetensors file")
    doc = tiny(settings={**TINY, "pretrained": "fake.safetensors"})
    err = sweep_exits_2(yaml.safe_dump(doc), capsys)
    assert "fake.safetensors" in err

"""Bad input stops before any compute, writes stay in their folders, nothing finished is lost."""

from __future__ import annotations

import json

import multiprocessing
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.cli import main
from harness.errors import ConfigError
from harness.sweep_file import load_sweep

ROOT = Path(__file__).resolve().parents[1]
RL_TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "data_episodes": 2,
           "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 10, "pretrain_batch_size": 8,
           "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def sweep_yaml(tmp_path: Path, **over) -> Path:
    doc = {"name": "tiny", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"lora": {"r": 2}}, "seeds": [0], "budget": {"steps": 4, "eval_episodes": 1, "batch_size": 8},
           "settings": RL_TINY, **over}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_resume_refuses_an_edited_study_naming_what_changed(tmp_path):
    from harness.driver import check_results, record_studies

    results = tmp_path / "results"
    check_results(load_sweep(sweep_yaml(tmp_path)), results, resume=False)
    record_studies(load_sweep(sweep_yaml(tmp_path)), results)  # what a first run keeps once Ray is up
    # a start that failed before its first wave left only the definition: no results, the rerun goes ahead
    check_results(load_sweep(sweep_yaml(tmp_path, seeds=[1])), results, resume=False)
    (results / "tiny" / "tiny-final").mkdir(parents=True)
    (results / "tiny" / "tiny-final" / "tuner.pkl").write_bytes(b"")  # what Tune writes when a wave begins
    with pytest.raises(ConfigError, match="already exist.*--resume"):
        check_results(load_sweep(sweep_yaml(tmp_path)), results, resume=False)
    check_results(load_sweep(sweep_yaml(tmp_path)), results, resume=True)  # unchanged: resumes
    edited = load_sweep(sweep_yaml(tmp_path, budget={"steps": 8, "eval_episodes": 1, "batch_size": 8}))
    with pytest.raises(ConfigError, match=r"changed: .*budget\.steps: 4 -> 8"):
        check_results(edited, results, resume=True)
    more = load_sweep(sweep_yaml(tmp_path, methods={"lora": {"r": 2}, "full": {}}))
    with pytest.raises(ConfigError, match=r"methods\.full: '\(absent\)' -> \{\}"):
        check_results(more, results, resume=True)


def test_resume_on_other_resources_and_after_new_keys(tmp_path, capsys):
    """Resources may change on resume (another machine: more cores per trial), named on the console; a key
    that newer code added to the study with its default is no edit; an edit beside a resources change is
    still refused."""
    from harness.driver import check_results, record_studies

    results = tmp_path / "results"
    record_studies(load_sweep(sweep_yaml(tmp_path)), results)
    (results / "tiny" / "tiny-final").mkdir(parents=True)
    (results / "tiny" / "tiny-final" / "tuner.pkl").write_bytes(b"")
    bigger = {"resources": {"cpus_per_trial": 3, "gpus_per_trial": 0.2}}
    check_results(load_sweep(sweep_yaml(tmp_path, **bigger)), results, resume=True)
    out = capsys.readouterr().out
    assert "other resources" in out and "resources.cpus_per_trial: 1.0 -> 3.0" in out
    saved = results / "tiny" / "tiny.study.json"
    doc = json.loads(saved.read_text())
    del doc["resources"]["checkpoint_minutes"]  # as a definition saved before that key existed
    doc["selection"].pop("seeds", None)
    saved.write_text(json.dumps(doc))
    check_results(load_sweep(sweep_yaml(tmp_path)), results, resume=True)
    edited = load_sweep(sweep_yaml(tmp_path, seeds=[1], **bigger))
    with pytest.raises(ConfigError, match=r"changed: seeds: \[0\] -> \[1\]\. Undo"):
        check_results(edited, results, resume=True)


@pytest.mark.parametrize("key, value", [("name", "../escape"), ("name", "/abs/path"), ("leaderboard", "../../x"),
                                        ("leaderboard", "a/b")])
def test_names_that_would_leave_their_folders_are_refused(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"key '{key}'=.*expected a plain name"):
        load_sweep(sweep_yaml(tmp_path, **{key: value}))


def _write_rows(out_dir: str, worker: int, n: int) -> None:
    from harness.leaderboard import update
    from harness.sweep_file import Study

    study = Study(name="s", track="vision", benchmark="builtin", methods={"full": {}}, leaderboard="board")
    for i in range(n):
        rec = {"track": "vision", "benchmark": "builtin", "task": f"t{worker}-{i}", "method": "full",
               "settings": "{}", "seed": 0, "status": "ok", "top1": 50.0, "trainable_params": 1, "head_params": 0,
               "peak_memory_mb": 0.0, "wall_time_s": 1.0, "backbone": "vit", "data_source": "synthetic",
               "date": "2026-11-24"}
        update([rec], study, Path(out_dir))


def test_concurrent_leaderboard_writers_lose_no_row(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    procs = [ctx.Process(target=_write_rows, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    table = pd.read_csv(tmp_path / "board.csv")
    assert len(table) == 60 and table["task"].nunique() == 60


def test_stale_temporary_files_are_cleaned_on_the_next_write(tmp_path):
    from harness.cache import temporary_prefix

    stale = tmp_path / f"{temporary_prefix(tmp_path / 'board.csv')}abc12345"  # as a killed writer left it
    stale.write_text("half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / f"{temporary_prefix(tmp_path / 'board.csv')}def45678"  # may still be being written
    fresh.write_text("being written")
    _write_rows(str(tmp_path), 0, 1)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("item, expected", [
    ("studies.5.budget.steps=1", r"'studies\.5' needs an index 0\.\.0"),
    ("studies.x.seeds=[0]", r"'studies\.x' needs an index 0\.\.0, got 'x'"),
    ("studies.0=5", r"key 'studies\.0'=5: expected a mapping"),
    ("budget.steps=abc", r"budget key 'steps'='abc': expected an integer"),
    ("budget.steps=-5", r"budget key 'steps'=-5: must be >= 0"),
    ("methods.lora.r=0", r"setting 'r'=0: must be >= 1"),
    ("methods.lora.lr=-1", r"setting 'lr'=-1.*must be > 0"),
    ("methods.lora.r=1000", r"methods\.lora: method 'lora': rank r=1000 is larger than layer 'blocks\.0\.attn\.qkv'"),
    ("methods={adalora: {r: 30}}", r"initial rank r \+ init_r_extra=34 is larger than layer"),
    ("methods={glora: {ranks: [64]}}", r"largest rank of 'ranks'=64 is larger than layer"),
    ("methods={eigenlora: {bank_dir: /no/such/bank}}", r"setting 'bank_dir'='/no/such/bank': no such file or folder"),
])
def test_bad_overrides_fail_before_compute_without_traceback(tmp_path, capsys, item, expected):
    results = tmp_path / "results"
    assert main(["sweep", str(sweep_yaml(tmp_path)), "--set", item, "--results", str(results),
                 "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(expected, err), err
    assert not results.exists() and not (tmp_path / "cache").exists()  # nothing ran, nothing was built


def test_scientific_notation_is_a_number(tmp_path):
    sweep = load_sweep(sweep_yaml(tmp_path), ["methods.lora.lr=1e-4", "settings.pretrain_lr=3e-4"])
    from harness.sweep_file import study_trials

    (spec,) = study_trials(sweep.studies[0], "final")
    assert spec.method_settings["lr"] == 1e-4 and isinstance(spec.method_settings["lr"], float)
    assert sweep.studies[0].settings["pretrain_lr"] == "3e-4"  # as YAML read it; the track model makes it a number
    from harness.tracks import get_track

    assert get_track("rl").settings(sweep.studies[0].settings).pretrain_lr == 3e-4


def test_only_applies_overrides_to_the_study_that_runs():
    quickstart = ROOT / "sweeps" / "quickstart.yaml"
    with pytest.raises(ConfigError, match="unknown rl setting"):  # every study: the vision key is not an RL one
        load_sweep(quickstart, ["settings.backbone=vit_small_patch16_224"])
    sweep = load_sweep(quickstart, ["settings.backbone=vit_small_patch16_224"], only="vision")
    assert [s.name for s in sweep.studies] == ["vision"]
    assert sweep.studies[0].settings["backbone"] == "vit_small_patch16_224"
    with pytest.raises(ConfigError, match="--only 'nope': no such study.*rl, vision"):
        load_sweep(quickstart, [], only="nope")


def test_results_naming_a_file_is_refused(tmp_path, capsys):
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    assert main(["sweep", str(sweep_yaml(tmp_path)), "--results", str(afile), "--no-dashboard"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["sweep", str(sweep_yaml(tmp_path)), "--results", str(afile / "sub"), "--no-dashboard"]) == 2
    assert "results.txt' is a file, not a folder" in capsys.readouterr().err  # names the part in the way


def test_ambiguous_run_setting_is_refused(capsys):
    assert main(["run", "--track", "rl", "--benchmark", "cw10", "--task", "hammer", "--method", "lora",
                 "--set", "dropout=0.1"]) == 2
    err = capsys.readouterr().err
    assert "'dropout' is ambiguous" in err and "--set method.dropout=0.1" in err and "settings.dropout" in err


def test_sweep_exit_status_tells_all_failed_from_some(tmp_path, monkeypatch):
    import harness.driver

    def fake(statuses):
        return lambda *a, **k: {"s": [{"status": s} for s in statuses]}

    path = sweep_yaml(tmp_path)
    board = tmp_path / "board"
    for statuses, code in ((["ok", "ok"], 0), (["ok", "failed"], 1), (["failed", "failed"], 3)):
        monkeypatch.setattr(harness.driver, "run_sweep", fake(statuses))
        assert main(["sweep", str(path), "--results", str(tmp_path / "r"), "--leaderboard", str(board)]) == code


def test_a_failed_adapter_save_keeps_the_trials_scores(monkeypatch):
    import harness.adapter_store
    from harness.trial import TrialSpec
    from harness.finetune import run_trial

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(harness.adapter_store, "save_trial_adapter", full_disk)
    spec = TrialSpec("vision", "builtin", "shapes", "lora", {"r": 2}, 0, {"steps": 2, "batch_size": 8},
                     {"backbone": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 2},
                      "weights": "random", "threads": 1})
    record = run_trial(spec, lambda m: None)
    assert record.status == "ok" and "top1" in record.metrics
    assert "No space left" in record.extra["adapter_error"] and record.adapter_path == ""


def test_unreadable_weights_and_foreign_csvs_are_clear_errors(tmp_path, capsys):
    junk = tmp_path / "weights.npz"
    junk.write_bytes(os.urandom(2000))
    assert main(["run", "--track", "vision", "--benchmark", "builtin", "--task", "shapes", "--method", "linear",
                 "--weights", str(junk), "--set", "backbone=vit_tiny_patch16_224", "--set", "img_size=32",
                 "--set", "model_kwargs={patch_size: 8, depth: 2}", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "weights.npz: could not be read as .npz" in err and "Traceback" not in err
    board = tmp_path / "board"
    board.mkdir()
    (board / "empty.csv").write_text("")
    (board / "other.csv").write_text("a,b\n1,2\n")
    with pytest.warns(UserWarning, match="not a leaderboard CSV"):
        assert main(["leaderboard", "--out", str(board)]) == 2
    assert "no leaderboard CSVs" in capsys.readouterr().err


def test_vision_ranks_are_checked_against_the_backbone_before_compute(capsys):
    assert main(["run", "--track", "vision", "--benchmark", "builtin", "--task", "shapes", "--method", "lora",
                 "--set", "backbone=vit_tiny_patch16_224", "--set", "r=500"]) == 2
    assert "rank r=500 is larger than layer 'blocks.0.attn.qkv' allows (576x192, at most 192)" in capsys.readouterr().err


def test_an_address_where_nothing_answers_fails_within_seconds(tmp_path, capsys):
    started = time.time()
    assert main(["sweep", str(sweep_yaml(tmp_path)), "--address", "127.0.0.1:1", "--results",
                 str(tmp_path / "r"), "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert time.time() - started < 30 and "'127.0.0.1:1': nothing answers there" in err and "ray start" in err
    # nothing was recorded: the same command, once a cluster answers, needs no --resume
    assert not list((tmp_path / "r").rglob("*.study.json"))


def test_trials_larger_than_every_node_are_refused():
    from harness.driver import check_resources

    sweep = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    check_resources(sweep.studies, [{"CPU": 2.0}])
    big = load_sweep(ROOT / "sweeps" / "quickstart.yaml", ["resources.cpus_per_trial=64"], only="rl")
    with pytest.raises(ConfigError, match=r"cpus_per_trial=64.0 but the largest node of the cluster has 16 CPUs"):
        check_resources(big.studies, [{"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0}])
    gpu = load_sweep(ROOT / "sweeps" / "quickstart.yaml", ["resources.gpus_per_trial=0.5"], only="rl")
    with pytest.raises(ConfigError, match=r"gpus_per_trial=0.5 but the largest node of the cluster has 0 GPUs"):
        check_resources(gpu.studies, [{"CPU": 2.0}])

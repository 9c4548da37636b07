"""Tracking through Ray Tune's integrations: ``tracking: [mlflow]`` in a sweep writes an MLflow file-store
run per trial with its parameters and metrics; an unknown tracker is refused before any compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.errors import ConfigError
from harness.sweep_file import load_sweep
from test_sweep_e2e import TINY


def _sweep(tmp_path: Path, tracking) -> Path:
    doc = {"name": "tracked", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"lora": {"r": 2, "lr": 1.0e-3}}, "seeds": [0], "tracking": tracking,
           "budget": {"steps": 8, "eval_episodes": 1, "batch_size": 8, "report_every": 4}, "settings": TINY,
           "leaderboard": "tracked", "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}}
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_unknown_tracker_is_refused_with_the_valid_names(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_sweep(_sweep(tmp_path, ["mlflow", "tensorboard"]))
    assert "tracking.1" in str(e.value) and "'tensorboard'" in str(e.value)
    assert "'mlflow'" in str(e.value) and "'wandb'" in str(e.value)
    assert load_sweep(_sweep(tmp_path, ["mlflow"])).tracking == ["mlflow"]
    assert load_sweep(_sweep(tmp_path, []), ["tracking=[wandb]"]).tracking == ["wandb"]


def test_mlflow_tracking_writes_a_file_store_run(tiny_rl_sweep):
    """The shared tiny sweep (tests/conftest.py) tracks to MLflow: one file-store run per trial."""
    pytest.importorskip("mlflow", reason="the mlflow extra (part of the test extra) is not installed")
    sweep = tiny_rl_sweep
    assert sweep.tracking == ("mlflow",)
    assert (sweep.results / "tiny" / "tiny-records.jsonl").is_file(), sweep.output[-4000:]
    store = sweep.results / "tiny" / "mlruns"
    experiments = [p for p in store.iterdir() if (p / "meta.yaml").is_file() and p.name not in (".trash", "0")]
    (experiment,) = [p for p in experiments if yaml.safe_load((p / "meta.yaml").read_text())["name"] == "tiny"]

    def param(run: Path, key: str) -> str | None:
        file = run / "params" / key
        return file.read_text() if file.is_file() else None

    def study(run: Path) -> str | None:
        file = run / "tags" / "study"
        return file.read_text() if file.is_file() else None

    # the sweep's experiment holds both of its studies' trials; the study tag tells them apart
    runs = [p for p in experiment.iterdir() if (p / "meta.yaml").is_file() and study(p) == "tiny"]
    assert len(runs) == len(sweep.records()) == 4  # one run per trial
    (run,) = [r for r in runs if param(r, "spec/method") == "lora"]
    assert yaml.safe_load((run / "meta.yaml").read_text())["status"] in (3, "FINISHED")
    params = {p.relative_to(run / "params").as_posix(): p.read_text() for p in (run / "params").rglob("*") if p.is_file()}
    assert params.get("spec/method") == "lora" and params.get("spec/task") == "window-close", sorted(params)
    assert params["spec/method_settings/r"] == "2" and params["spec/budget/steps"] == "8"
    metrics = {p.name: p.read_text().split() for p in (run / "metrics").iterdir() if p.is_file()}
    # each line of a metric file: timestamp value step; the final report carries the score and the costs
    assert 0.0 <= float(metrics["success"][1]) <= 1.0
    assert float(metrics["trainable_params"][1]) > 0 and float(metrics["ms_per_update"][1]) > 0
    assert "loss" in metrics  # the intermediate reports too
    tags = {p.name: p.read_text() for p in (run / "tags").iterdir()}
    assert tags["study"] == "tiny" and tags["harness.sweep"] == "tiny"


def test_mlflow_records_a_trial_it_never_saw_start_instead_of_ending_the_sweep(tmp_path, monkeypatch):
    """A trial whose worker failed to start reaches the callback's end without its start (seen on a loaded
    machine): Ray's own callback raised KeyError there and took the sweep down."""
    mlflow = pytest.importorskip("mlflow")
    from ray.tune.experiment import Trial

    from harness.experiment_logging import mlflow_callback, mlflow_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_uri(tmp_path, "sweep")
    cb = mlflow_callback(uri, "sweep", {"study": "s"})
    cb.setup()
    trial = Trial("fn", config={"lr": 0.1}, stub=True, trial_id="t0")
    cb.log_trial_end(trial, failed=True)  # never started: no KeyError
    runs = mlflow.search_runs(experiment_names=["sweep"], output_format="list", filter_string="")
    assert [r.info.status for r in runs] == ["FAILED"] and runs[0].data.tags["study"] == "s"

"""Experiment tracking through Ray Tune's own integrations: a sweep's ``tracking: [mlflow, wandb]``.

Each name turns on Ray's logger callback for the sweep's Tune experiments. Both stay on this machine
unless told otherwise: MLflow writes to a local file store under the sweep's results folder
(``<results>/<sweep>/mlruns``; ``MLFLOW_TRACKING_URI`` overrides it), Weights & Biases runs in offline mode
(``WANDB_MODE`` overrides it; ``wandb sync`` uploads later). The packages are optional extras:
``pip install -e '.[mlflow]'`` or ``'.[wandb]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

TRACKERS = ("mlflow", "wandb")  # the names a sweep's ``tracking`` list accepts


def check_installed(names: list[str]) -> None:
    """Before any compute: each tracker's package must import, or a ConfigError says which extra to install."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"tracking: [{name}] needs the {name} package; install it with "
                              f"pip install -e '.[{name}]'")


def mlflow_uri(results_dir: Path, sweep: str) -> str:
    """Where MLflow runs go: ``MLFLOW_TRACKING_URI`` if set, else a file store beside the sweep's results.

    MLflow 3 keeps its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is
    true; the harness opts in for the store it chooses itself (plain files, no database package, readable
    by ``mlflow ui --backend-store-uri``), and leaves a user's own URI alone."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(results_dir) / sweep / "mlruns").resolve().as_uri()


def callbacks(names: list[str], results_dir: Path, sweep: str, study: str) -> list[Any]:
    """Ray Tune logger callbacks for ``names`` (each of :data:`TRACKERS`); one MLflow experiment (or W&B
    project) per sweep, the study as a tag (or group)."""
    check_installed(names)
    out: list[Any] = []
    for name in names:
        if name == "mlflow":
            out.append(mlflow_callback(mlflow_uri(results_dir, sweep), sweep, {"study": study, "harness.sweep": sweep}))
        elif name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            out.append(WandbLoggerCallback(project=sweep, group=study, mode=os.environ.get("WANDB_MODE", "offline"),
                                           dir=str((Path(results_dir) / sweep).resolve())))
        else:
            raise ConfigError(f"tracking: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
    return out


def mlflow_callback(uri: str, experiment: str, tags: dict[str, str]) -> Any:
    """Ray's ``MLflowLoggerCallback``, made to survive a trial it never saw start.

    Ray's callback keeps its MLflow run per trial from ``log_trial_start``; a trial whose worker failed to
    start can reach ``log_trial_end`` (or a result) without it, and the callback's ``KeyError`` then ended
    the whole sweep instead of letting Ray retry the trial. Here such a trial gets its run first, so it
    is recorded (FAILED when it failed) and the sweep goes on."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback  # heavy: imports mlflow

    class TrialSafeMLflowLoggerCallback(MLflowLoggerCallback):
        def log_trial_result(self, iteration, trial, result):
            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            super().log_trial_result(iteration, trial, result)

        def log_trial_end(self, trial, failed: bool = False):
            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            super().log_trial_end(trial, failed=failed)

    return TrialSafeMLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, tags=tags)


__all__ = ["TRACKERS", "callbacks", "check_installed", "mlflow_callback", "mlflow_uri"]

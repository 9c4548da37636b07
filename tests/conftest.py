"""Fixtures shared by several test files.

``tiny_rl_sweep``: one tiny RL sweep through ``python -m harness sweep`` (a fresh local Ray instance, real
trials, real rollouts) whose outputs several end-to-end tests assert on, each on the part it is about:
a NaN trial that fails alone (tests/test_sweep_e2e.py), MLflow tracking (tests/test_tracking.py) and a
plugin method that runs in the Ray workers (tests/test_extension.py). Each of those once ran its own
sweep; they paid Ray's start, the workers' imports, the data and the pretrained DT three times over for
trials that are independent of one another.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TinySweep:
    """What ``tiny_rl_sweep`` ran and left."""

    results: Path  # --results
    board: Path  # --leaderboard
    returncode: int
    output: str  # stdout and stderr, interleaved as a user sees them
    plugin_method: str  # the plugin method's registered name
    tracking: tuple[str, ...]  # the sweep's trackers (mlflow when installed)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.results / "tiny" / "tiny-records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_rl_sweep(tmp_path_factory) -> TinySweep:
    """One sweep of four independent trials of window-close on the tiny DT, one after another or two at a
    time on two 1-CPU slots: ``full`` at lr 1e-4 and at 1e30 (its loss turns NaN), ``lora`` r=2, and the
    toy BitFit plugin method; with ``tracking: [mlflow]`` when mlflow is installed."""
    from tests.test_extension import BITFIT, write_module
    from tests.test_sweep_e2e import TINY

    tmp = tmp_path_factory.mktemp("tiny-rl-sweep")
    module = f"bitfit_plugin_{uuid.uuid4().hex[:8]}"
    name = f"bitfit-{uuid.uuid4().hex[:8]}"
    plugins = tmp / "plugins"
    write_module(plugins, module, BITFIT.format(name=name))
    tracking = ("mlflow",) if importlib.util.find_spec("mlflow") else ()
    doc = {"name": "tiny", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"], "plugins": [module],
           "methods": {"full": {"lr": [1.0e-4, 1.0e30]}, "lora": {"r": 2, "lr": 1.0e-3},
                       name: {"bias_lr_scale": 4.0}},
           "seeds": [0], "tracking": list(tracking),
           "budget": {"steps": 8, "eval_episodes": 1, "batch_size": 8, "report_every": 4},
           "settings": TINY, "leaderboard": "tiny-cw10",
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HARNESS_CACHE=str(tmp / "cache"), RAY_DEDUP_LOGS="0")
    # Ray's workers import plugin modules from PYTHONPATH, as the driver does
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), str(ROOT), env.get("PYTHONPATH", "")])
    res, board = tmp / "results", tmp / "board"
    proc = subprocess.run([sys.executable, "-m", "harness", "sweep", str(path), "--results", str(res),
                           "--leaderboard", str(board), "--no-dashboard"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    return TinySweep(res, board, proc.returncode, proc.stdout, name, tracking)

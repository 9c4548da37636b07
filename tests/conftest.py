"""Fixtures shared by several test files.

``tiny_rl_sweep``: one tiny RL sweep through ``python -m harness sweep`` (a fresh local Ray instance, real
trials, real rollouts) whose outputs several end-to-end tests assert on, each on the part it is about:
a NaN trial that fails alone (tests/test_sweep_e2e.py), MLflow tracking (tests/test_tracking.py), a
plugin method that runs in the Ray workers (tests/test_extension.py), and, in a second study, held-out
selection and EigenLoRA's banks (tests/test_protocol_fidelity.py). Each of those once ran its own sweep;
they paid Ray's start, the driver's and the workers' imports, the data and the pretrained DT four times
over for trials that are independent of one another.

``interrupted_rl_sweep``: one tiny RL sweep interrupted by Ctrl-C and resumed, with a checkpoint lost in
between, for the interrupted-sweep test (tests/test_sweep_e2e.py) and the missing-checkpoint test
(tests/test_resume_missing_checkpoint.py), which once interrupted and resumed a sweep each, and for the test
that a sweep leaves the rest of its leaderboard folder alone (tests/test_reliability_publish.py), which once
ran a sweep of its own.

``selection_bench``: one ``bench selection`` run (a full grid and an ASHA run of a tiny vision study), for
the bench's own test (tests/test_bench_selection.py) and the ASHA test (tests/test_selection_scheduler.py),
whose sweep is the bench's scheduler run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def _module_cache_dir(tmp_path_factory, request) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "cache"


@pytest.fixture()
def cache(_module_cache_dir, monkeypatch):
    """One ``HARNESS_CACHE`` per test module: a module's tests share settings, so its data and pretrained DT
    are built once (the cache keys on the settings; tests/test_cache.py is about the cache itself). A module
    that needs a cache per test defines its own ``cache``."""
    from harness.cache import ArtifactCache

    monkeypatch.setenv("HARNESS_CACHE", str(_module_cache_dir))
    return ArtifactCache(_module_cache_dir)

# The tests start throwaway local Ray clusters, in this process and in subprocesses. Ray reads its auth mode
# once per process, and a GCS it starts later reads the environment: with the mode unset, a machine that
# holds a token file (~/.ray/auth_token) gave the cluster test's in-process driver "disabled" and a later
# in-process cluster's GCS "token", which then refused its own driver. One mode for the whole session; the
# token test sets its own in the processes it starts.
os.environ["RAY_AUTH_MODE"] = "disabled"


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
    """One sweep, two studies, with ``tracking: [mlflow]`` when mlflow is installed. ``tiny``: four
    independent trials of window-close on the tiny DT, two at a time on two 1-CPU slots: ``full`` at lr
    1e-4 and at 1e30 (its loss turns NaN), ``lora`` r=2, and the toy BitFit plugin method. ``pf``: the
    select-then-final study of tests/test_protocol_fidelity.py (held-out selection, EigenLoRA banks)."""
    from tests.test_extension import BITFIT, write_module
    from tests.test_protocol_fidelity import pf_study
    from tests.test_sweep_e2e import TINY

    tmp = tmp_path_factory.mktemp("tiny-rl-sweep")
    module = f"bitfit_plugin_{uuid.uuid4().hex[:8]}"
    name = f"bitfit-{uuid.uuid4().hex[:8]}"
    plugins = tmp / "plugins"
    write_module(plugins, module, BITFIT.format(name=name))
    tracking = ("mlflow",) if importlib.util.find_spec("mlflow") else ()
    tiny = {"name": "tiny", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
            "methods": {"full": {"lr": [1.0e-4, 1.0e30]}, "lora": {"r": 2, "lr": 1.0e-3},
                        name: {"bias_lr_scale": 4.0}},
            "seeds": [0], "budget": {"steps": 8, "eval_episodes": 1, "batch_size": 8, "report_every": 4},
            "settings": TINY, "leaderboard": "tiny-cw10", "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}}
    doc = {"name": "tiny", "plugins": [module], "tracking": list(tracking),
           "studies": [tiny, pf_study(tmp, TINY)]}  # the second: tests/test_protocol_fidelity.py's
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


@dataclass(frozen=True)
class InterruptedSweep:
    """What ``interrupted_rl_sweep`` ran and left."""

    folder: Path  # the working folder the commands ran in
    experiment: Path  # the Tune experiment of the sweep's final stage
    first: subprocess.CompletedProcess  # the interrupted command (returncode 130 expected)
    resumed: subprocess.CompletedProcess  # the same command with --resume
    finished_before: tuple[str, ...]  # trial folders finished before Ctrl-C, seen as it arrived
    done_before: tuple[str, ...]  # trial folders with a final record after the interrupted command ended
    records_after_interrupt: bool  # whether the interrupted command left a records file
    kept: Path  # the paused trial's checkpoint left in place
    gone: Path  # the paused trial's checkpoint removed before --resume
    steps: int
    checkpoint_every: int
    board_before: dict[str, tuple[bytes, int]]  # the leaderboard folder's files before the first command

    def records(self) -> list[dict]:
        text = (self.folder / "results" / "tiny" / "tiny-records.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="session")
def interrupted_rl_sweep(tmp_path_factory) -> InterruptedSweep:
    """The README's recovery path as a user meets it, in a working folder with the default (relative)
    --results and --leaderboard: three ``full`` trials on two 1-CPU slots, checkpointing every 4 of their 8
    updates. The lr 2e-4 and 3e-4 trials wait after their first checkpoint (a test hook), so Ctrl-C (SIGINT
    to the driver) arrives with the lr 1e-4 trial finished and the other two mid-way, however fast this
    machine is. Then one of the two checkpoints is removed (results moved without it) and the same command
    with --resume finishes the sweep. tests/test_sweep_e2e.py asserts on the interruption and the finished
    trial, tests/test_resume_missing_checkpoint.py on the two resumed trials, and
    tests/test_reliability_publish.py on the leaderboard folder, which held another board and a user's files
    before the first command."""
    from harness.tune_trial import PAUSE_TRIAL, PAUSED_MARKER
    from tests.test_reliability_publish import seed_board_folder
    from tests.test_sweep_e2e import TINY

    steps, every = 8, 4
    tmp = tmp_path_factory.mktemp("interrupted-rl-sweep")
    doc = {"name": "tiny", "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"full": {"lr": [1.0e-4, 2.0e-4, 3.0e-4]}}, "seeds": [0],
           "budget": {"steps": steps, "eval_episodes": 1, "batch_size": 8, "report_every": 4},
           "settings": TINY, "leaderboard": "tiny-cw10",
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "checkpoint_every": every}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(doc))
    board_before = seed_board_folder(tmp / "leaderboard")  # the default --leaderboard
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HARNESS_CACHE=str(tmp / "cache"), RAY_DEDUP_LOGS="0")
    args = [sys.executable, "-m", "harness", "sweep", "tiny.yaml", "--no-dashboard", "--cpus", "2"]
    proc = subprocess.Popen(args, cwd=tmp, env={**env, PAUSE_TRIAL: "_lr0.0002_,_lr0.0003_"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    exp = tmp / "results" / "tiny" / "tiny-final"

    def finished() -> list[str]:
        return sorted(p.parent.name for p in exp.glob("*/result.json") if '"record"' in p.read_text())

    try:
        deadline = time.time() + 400
        # the paused trials wait ten minutes: time enough for Tune to write the first one's final result
        while time.time() < deadline and proc.poll() is None and not (
                len(list(exp.glob(f"*/{PAUSED_MARKER}"))) == 2 and finished()):
            time.sleep(0.5)
        running = proc.poll() is None
        finished_before = finished()
        os.kill(proc.pid, signal.SIGINT)  # the driver alone, as `kill -INT`; Ctrl-C reaches its Ray workers too
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = subprocess.CompletedProcess(args, proc.returncode, out if running else "the sweep ended before "
                                        "it could be interrupted:\n" + out, "")
    done_before = finished()
    records_after_interrupt = (tmp / "results" / "tiny" / "tiny-records.jsonl").exists()
    checkpoints = sorted(exp.glob("*/checkpoint_*"))
    assert len(checkpoints) == 2, first.stdout[-3000:]  # the paused trials', one each
    kept, gone = checkpoints  # lr 2e-4's is kept, lr 3e-4's lost
    shutil.rmtree(gone)
    resumed = subprocess.run([*args, "--resume"], cwd=tmp, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=600)
    return InterruptedSweep(tmp, exp, first, resumed, tuple(finished_before), tuple(done_before),
                            records_after_interrupt, kept, gone,
                            steps, every, board_before)


@dataclass(frozen=True)
class SelectionBench:
    """What ``selection_bench`` ran and left."""

    folder: Path  # the working folder the command ran in (relative --set file=..., workdir=..., --out ...)
    command: list[str]
    done: subprocess.CompletedProcess
    env: dict[str, str]
    steps: int
    lrs: list[float]
    grace: int

    def select_records(self, run: str) -> list[dict]:
        """The selection stage's records of the ``grid`` or the ``scheduler`` run."""
        path = next((self.folder / "work" / run).rglob("*-select-records.jsonl"))
        return [json.loads(x) for x in path.read_text().splitlines()]

    def final_records(self, run: str) -> list[dict]:
        """The final stage's records of the ``grid`` or the ``scheduler`` run."""
        path = next(p for p in (self.folder / "work" / run).rglob("*-records.jsonl")
                    if not p.name.endswith("-select-records.jsonl"))
        return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def selection_bench(tmp_path_factory) -> SelectionBench:
    """``python -m harness bench selection`` as a user runs it from a working folder with relative paths, on
    a tiny vision study with a select-then-final protocol: ``full`` over four learning rates (selected, under
    ASHA in the scheduler run: grace 4 of 16 updates, reduction factor 2, one trial at a time so ASHA compares
    each with all the earlier ones, checkpoints every 4 updates) and ``linear`` at one point (no selection).
    tests/test_bench_selection.py asserts on the comparison, tests/test_selection_scheduler.py on the
    scheduler run's own sweep (which once ran by itself)."""
    from tests.test_selection_scheduler import GRACE, LRS, STEPS, TINY

    tmp = tmp_path_factory.mktemp("selection-bench")
    doc = {"name": "sel", "track": "vision", "benchmark": "builtin", "tasks": ["shapes"],
           "protocol": "select-then-final", "seeds": [0],
           "selection": {"seeds": [0], "scheduler": "asha", "grace_period": GRACE, "reduction_factor": 2},
           "methods": {"full": {"lr": LRS}, "linear": {"lr": [1.0e-2]}},  # linear: one point, no selection
           "budget": {"steps": STEPS, "batch_size": 8}, "settings": TINY,
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1, "checkpoint_every": GRACE}}
    (tmp / "sel.yaml").write_text(yaml.safe_dump(doc))
    env = dict(os.environ, HARNESS_CACHE=str(tmp / "cache"), RAY_DEDUP_LOGS="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "harness", "bench", "selection", "--set", "file=sel.yaml", "--set", "workdir=work",
           "--out", "sel.json"]
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    return SelectionBench(tmp, cmd, done, env, STEPS, list(LRS), GRACE)

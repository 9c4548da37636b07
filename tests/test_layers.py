"""The layers as a contract (issue 19, item 3): `lint-imports` checks pyproject.toml's import-linter contracts
(the command line on top, the tracks below it, the harness core below the tracks, no new import cycles).
It passes on the tree, and fails on a copy of the tree with a planted cycle or a core module importing a
track."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "agents", "vision")
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e .[test])")


def lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the packages analysed are the ones under ``root``, not an installed copy
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_tree(dest: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}  # planted by tests/test_layers.py\n")


def test_the_tree_keeps_its_contracts():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_a_planted_cycle_breaks_the_contract(tmp_path):
    root = copy_tree(tmp_path)
    assert lint(root).returncode == 0  # the copy itself is clean
    # harness.tracks imports harness.errors; errors importing tracks back closes a cycle
    plant(root / "harness" / "errors.py", "import harness.tracks")
    out = lint(root)
    assert out.returncode != 0
    assert "No new import cycles between sibling modules" in out.stdout and "BROKEN" in out.stdout, out.stdout[-3000:]
    assert ".errors -> .tracks" in out.stdout or ".tracks -> .errors" in out.stdout, out.stdout[-3000:]


def test_a_core_module_importing_a_track_breaks_the_contract(tmp_path):
    root = copy_tree(tmp_path)
    plant(root / "harness" / "trial.py", "import agents.dt")
    out = lint(root)
    assert out.returncode != 0
    assert "The harness core imports no track" in out.stdout and "harness.trial -> agents.dt" in out.stdout, \
        out.stdout[-3000:]


def test_method_settings_are_resolved_in_one_place():
    """Issue 19, item 1: a method's settings are resolved once, in ``harness.trial.resolve_point``; the
    driver, the trial, the engine and the leaderboard take the resolved trial as given. A second production
    call of ``resolve_settings(`` (outside its definition) fails here, naming where it is."""
    import re

    calls = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "resolve_settings(" in line and not re.match(r"\s*def resolve_settings\(", line):
                    calls.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert len(calls) == 1 and calls[0].startswith("harness/trial.py:"), "\n".join(calls)

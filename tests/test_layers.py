"""The layers as a contract (issue 19, item 3): `lint-imports` checks pyproject.toml's import-linter contracts
(the command line on top, the tracks below it, the harness core below the tracks, no import cycles).
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
    assert "No import cycles between sibling modules" in out.stdout and "BROKEN" in out.stdout, out.stdout[-3000:]
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


# what a function-level import of the project's own modules must say, on its line or the line above it
IMPORT_REASONS = ("heavy:", "optional:")  # no "cycle:": the tree has none, and the contract allows none


def _project_module(node, module: str, is_package: bool) -> str | None:
    """The project module an import statement inside ``module`` names, or None for a third-party one."""
    import ast

    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [base]
    hits = [n for n in names if n.split(".")[0] in PACKAGES]
    return hits[0] if hits else None


def function_level_imports(root: Path) -> list[str]:
    """Every import of a project module inside a function under ``root``'s packages without a reason comment
    (one of IMPORT_REASONS) on its lines or the line above, as ``path:line: statement``."""
    import ast

    missing = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            parts = list(path.relative_to(root).with_suffix("").parts)
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for func in ast.walk(ast.parse(text)):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(func):
                    if not isinstance(node, (ast.Import, ast.ImportFrom)):
                        continue
                    if _project_module(node, module, path.name == "__init__.py") is None:
                        continue
                    around = lines[node.lineno - 2: node.end_lineno]
                    comments = [ln.split("#", 1)[1].strip() for ln in around if "#" in ln]
                    if not any(c.startswith(IMPORT_REASONS) for c in comments):
                        missing.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return sorted(set(missing))  # a nested function's import is seen from each enclosing one


def test_function_level_imports_of_the_project_say_why():
    """Issue 19, item 3: the project's own modules are imported at module level, except where a heavy or
    optional dependency justifies importing inside a function; such an import says why in
    a comment (``# heavy: harness.methods imports torch``, ``# optional: ...``) on its line
    or the line above. A new one without its reason fails here, naming where it is: move it to the top of
    the module, or give the reason."""
    missing = function_level_imports(ROOT)
    assert not missing, "function-level imports of project modules without a reason:\n" + "\n".join(missing)


def test_an_unexplained_function_level_import_is_found(tmp_path):
    root = copy_tree(tmp_path)
    assert function_level_imports(root) == []
    plant(root / "harness" / "cache.py", "def _late():\n    from harness.errors import ConfigError\n    return ConfigError")
    plant(root / "harness" / "cache.py", "def _late_relative():\n    from .errors import DataError\n    return DataError")
    plant(root / "harness" / "cache.py", "def _said():\n    from harness.errors import DataError  # heavy: test\n    return DataError")
    found = function_level_imports(root)
    assert sorted(f.split(": ", 1)[1] for f in found) == ["from .errors import DataError",
                                                         "from harness.errors import ConfigError"], found
    assert all(f.startswith("harness/cache.py:") for f in found)

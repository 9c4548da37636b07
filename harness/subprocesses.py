"""Harness commands run as child processes by the benches (a sweep per GPU count, per selection run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_logged(cmd: list[str], log: Path, env_extra: dict[str, str] | None = None, prefix: str = "") -> int:
    """Run ``cmd`` from the project root; its output goes to our stderr (a bench's stdout is its JSON), each
    line after ``prefix`` (to tell runs apart that share it), and to ``log``. Returns the exit status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # type: ignore[union-attr]
            f.write(line)
            sys.stderr.write(prefix + line)
        return proc.wait()

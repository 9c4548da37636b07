"""What made a record: package versions, the harness's git commit and the device, read once per process."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from harness.tracks import TRACKS

PACKAGES = ("torch", "peft", "timm", "ray", "metaworld", "mujoco", "gymnasium")


def code_paths() -> tuple[str, ...]:
    """What counts as the harness's code in its checkout: the harness itself, the top-level package of
    every track the registry names (``harness/tracks.py``) that lives in this checkout, and pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    packages = sorted({target.split(":")[0].split(".")[0] for target in TRACKS.values()} - {"harness"})
    return ("harness", *(p for p in packages if (root / p).is_dir()), "pyproject.toml")


@functools.lru_cache(maxsize=1)
def software() -> dict[str, str]:
    """Installed versions of the packages a result depends on ("not installed" where absent)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["torch"] = torch.__version__  # the build tag (+cu130, +cpu) tells which kernels ran
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the harness checkout, with "+dirty" when tracked files changed. Outside a checkout (a
    copy of the code on a machine without its .git, an installed wheel) the commit the environment
    declares in ``HARNESS_GIT_COMMIT``, marked "(declared)", else "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # only the code counts: a sweep rewriting the tracked leaderboard/ must not mark its own trials dirty
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                *code_paths()], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        declared = os.environ.get("HARNESS_GIT_COMMIT", "").strip()
        return f"{declared} (declared)" if declared else "unknown"
    return f"{commit}+dirty" if dirty else commit or "unknown"


def stamp(command: str, device: str) -> dict[str, object]:
    """The facts a measurement's JSON opens with: the command that made it, the device's model, the commit
    and the package versions."""
    return {"command": command, "device_name": device_name(device), "git_commit": git_commit(),
            "software": software()}


@functools.lru_cache(maxsize=8)
def device_name(device: str) -> str:
    """The GPU model for a CUDA device, else the CPU model."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return _cpu_model()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine() or "unknown")

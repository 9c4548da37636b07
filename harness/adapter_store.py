"""Trained adapters in the artifact cache: saved by every trial, read back as EigenLoRA's bank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from harness.cache import ArtifactCache

KIND = "adapters"
# what a saved adapter's trial.json tags it with, from the trial's plain config
TAG_KEYS = ("track", "benchmark", "task", "method", "seed")


def save_trial_adapter(write: Callable[[Path], None], trial: Mapping[str, Any], settings: Mapping[str, Any],
                       base_key: str, cache: ArtifactCache | None = None) -> Path:
    """Save a trained adapter into the cache, tagged with the base model's key and the trial's task.

    The store takes plain keys and imports neither the methods (EigenLoRA reads its bank from here) nor the
    trial's types: ``write(folder)`` writes the adapter's files (the method's ``save``), ``trial`` is the
    trial as plain JSON values (``ResolvedTrial.to_config()``, the cache key), ``settings`` the method
    settings it was wrapped with. ``base_key`` identifies the frozen base model (e.g. the hash of the pretrained
    checkpoint); only adapters of the same base are ever combined into a bank.
    """
    cache = cache or ArtifactCache()
    key = {"spec": dict(trial), "base_key": base_key}
    name = f"{trial['task']}-{trial['method']}"

    def build(folder: Path) -> None:
        write(folder)
        tag = {**{k: trial[k] for k in TAG_KEYS}, "settings": dict(settings), "base_key": base_key}
        (folder / "trial.json").write_text(json.dumps(tag, indent=1, sort_keys=True, default=str))

    # A rerun of the same trial replaces its adapter: drop the old entry first.
    old = cache.lookup(KIND, name, key)
    if old is not None:
        shutil.rmtree(old.path, ignore_errors=True)
    return cache.get_or_build(KIND, name, key, build).path


def find_bank(base_key: str, exclude_task: str, methods: tuple[str, ...] = ("lora",),
              cache: ArtifactCache | None = None) -> list[Path]:
    """A bank from the cache, for trials run outside a sweep (a sweep's driver picks its bank from the
    sweep's own trials): one verified adapter of ``methods`` on ``base_key`` per task other than
    ``exclude_task``, a final-stage one before a selection-stage one, then the lowest seed, then the
    first folder by name."""
    cache = cache or ArtifactCache()
    root = cache.root / KIND
    best: dict[str, tuple[tuple[int, int, str], Path]] = {}
    if not root.is_dir():
        return []
    for tag_path in sorted(root.glob("*/trial.json")):
        try:
            tag = json.loads(tag_path.read_text())
        except ValueError:
            continue
        task = tag.get("task")
        if tag.get("base_key") != base_key or task == exclude_task or tag.get("method") not in methods:
            continue
        try:
            made_by = cache.verify(tag_path.parent)
        except Exception:
            continue
        stage = made_by.get("spec", {}).get("budget", {}).get("stage", "final")
        rank = (0 if stage == "final" else 1, int(tag.get("seed", 0)), tag_path.parent.name)
        if task not in best or rank < best[task][0]:
            best[task] = (rank, tag_path.parent)
    return [best[t][1] for t in sorted(best)]


def bank_manifest(sources: list[str]) -> list[dict[str, Any]]:
    """What each bank adapter is: its path and, for adapters a trial saved, that trial's task, method,
    seed and settings (its ``trial.json``); recorded with every EigenLoRA trial."""
    out = []
    for src in sources:
        entry: dict[str, Any] = {"path": str(src)}
        tag = Path(src) / "trial.json"
        if tag.is_file():
            try:
                info = json.loads(tag.read_text())
            except ValueError:
                info = {}
            entry.update({k: info[k] for k in ("benchmark", "task", "method", "seed", "settings") if k in info})
        out.append(entry)
    return out

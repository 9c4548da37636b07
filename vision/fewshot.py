"""Few-shot fine-grained datasets (GLoRA 3.2): Food101, Flowers102, Stanford Cars, Oxford Pets, FGVC Aircraft.

Layouts accepted under ``<root>/<dataset>/``:
- folder per class: ``train/<class>/<image>`` and ``test/<class>/<image>`` (optional ``val/<class>/``);
  classes are the sorted folder names of ``train/``;
- list files: ``train.txt`` and ``test.txt`` (optional ``val.txt``) with lines ``relative/path label``.

Tasks are named ``<dataset>-<k>shot`` (e.g. ``food101-4shot``). The k training images per class are
drawn with the trial's seed and recorded (their paths go into the trial's record). Selection ("select")
scores on ``val`` when the dataset has one, else on up to 5 other seeded images per class of ``train``
(disjoint from the shots); "final" trains on the shots and scores on ``test``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness.cache import ArtifactCache
from harness.errors import ConfigError, DataError
from vision.images import (Item, Split, TaskData, cached_split, decode_items, file_stamp, folder_items,
                           list_file_items, seeded_shots, split_shot_task)

DATASETS: dict[str, tuple[str, ...]] = {  # name -> folder spellings accepted
    "food101": ("food101", "food-101"),
    "flowers102": ("flowers102", "oxford_flowers102", "oxford_flowers"),
    "stanford_cars": ("stanford_cars", "cars"),
    "oxford_pets": ("oxford_pets", "oxford_iiit_pet", "oxford_pet", "pets"),
    "fgvc_aircraft": ("fgvc_aircraft", "aircraft", "fgvc-aircraft"),
}
SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
TASKS: list[str] = [f"{d}-{k}shot" for d in DATASETS for k in SHOTS]
VAL_PER_CLASS = 5


def parse_task(task: str) -> tuple[str, int]:
    """``food101-4shot`` -> ("food101", 4)."""
    parsed = split_shot_task(task, DATASETS)
    if parsed is None:
        raise ConfigError(f"few-shot task {task!r}: expected <dataset>-<k>shot with dataset in "
                          f"{', '.join(DATASETS)}, e.g. food101-4shot")
    return parsed


def dataset_dir(root: Path | str, dataset: str) -> Path:
    root = Path(root).expanduser()
    for s in DATASETS[dataset]:
        if (root / s).is_dir():
            return root / s
    raise DataError(f"few-shot dataset {dataset!r}: no folder {' or '.join(str(root / s) for s in DATASETS[dataset])}")


def split_items(folder: Path, split: str, required: bool = True) -> tuple[list[Item], int] | None:
    """Items of ``split`` from either layout, with the class count (from ``train``)."""
    if (folder / "train").is_dir():
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        index = {c: i for i, c in enumerate(classes)}
        if not (folder / split).is_dir():
            if required:
                raise DataError(f"few-shot dataset {folder}: folder {folder / split} does not exist")
            return None
        return folder_items(folder / split, index, f"few-shot {folder.name}/{split}"), len(classes)
    list_file = folder / f"{split}.txt"
    if not list_file.is_file():
        if not required:
            return None
        if not (folder / "train.txt").is_file():
            raise DataError(f"few-shot dataset {folder}: neither train/<class>/ folders nor a train.txt list file")
        raise DataError(f"list file {list_file} does not exist")
    train = list_file_items(folder / "train.txt", folder, None)
    n = max(it.label for it in train) + 1
    return list_file_items(list_file, folder, n), n


def _digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


def validate(root: Path | str, task: str) -> dict[str, int]:
    dataset, _k = parse_task(task)
    folder = dataset_dir(root, dataset)
    train, n = split_items(folder, "train")
    test, _ = split_items(folder, "test")
    return {"train_pool": len(train), "test": len(test), "classes": n}


def load_task(root: Path | str, task: str, size: int, seed: int, cache: ArtifactCache | None = None) -> TaskData:
    """Shots (seeded), a validation split and the test split, decoded at ``size``."""
    dataset, k = parse_task(task)
    folder = dataset_dir(root, dataset)
    train, n = split_items(folder, "train")
    chosen = seeded_shots([it.label for it in train], k, seed)
    shot_items = [train[i] for i in chosen]
    val_found = split_items(folder, "val", required=False)
    if val_found is not None:
        val_items = val_found[0]
    else:
        val_items = [train[i] for i in seeded_shots([it.label for it in train], VAL_PER_CLASS, seed + 10_007,
                                                    exclude=set(chosen))]
    test_items, _ = split_items(folder, "test")

    def load(items: list[Item], what: str) -> Split:
        paths = [str(it.path) for it in items]
        key = {"reader": "fewshot", "folder": str(folder.resolve()), "what": what, "size": size,
               "paths": _digest(paths), "labels": _digest([str(it.label) for it in items])}
        return cached_split(f"fewshot-{dataset}-{what}", key, lambda: decode_items(items, size), cache)

    shots = load(shot_items, f"{k}shot-s{seed}")
    val = load(val_items, f"val-s{seed}" if val_found is None else "val")
    test = load(test_items, "test")
    splits = {"train800": shots, "val200": val, "train800val200": shots, "test": test}
    return TaskData(task, n, splits, "real", info={"shots": k, "shot_paths": [str(it.path) for it in shot_items]})


__all__ = ["DATASETS", "SHOTS", "TASKS", "parse_task", "load_task", "validate", "file_stamp"]

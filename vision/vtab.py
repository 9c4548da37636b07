"""VTAB-1K in NOAH's layout: ``<root>/<task>/{train800,val200,train800val200,test}.txt`` with lines
``images/<split>/NNNNNN.jpg <label>`` relative to the task folder."""

from __future__ import annotations

from pathlib import Path

from harness.cache import ArtifactCache
from harness.errors import DataError
from vision.images import Split, TaskData, cached_split, decode_items, file_stamp, list_file_items

# task folder name -> number of classes, in the papers' order
TASKS: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}
GROUPS: dict[str, list[str]] = {
    "natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"],
}
# NOAH's scripts spell two folders differently; either spelling is accepted on disk and as a task name.
ALIASES: dict[str, str] = {"cifar100": "cifar", "oxford_pet": "oxford_iiit_pet"}
# the training images of each stage's split, the same for every task: train800 (select), train800val200 (final)
TRAIN_IMAGES: dict[str, int] = {"select": 800, "final": 1000}
LIST_FILES: dict[str, str] = {"train800": "train800.txt", "val200": "val200.txt",
                              "train800val200": "train800val200.txt", "test": "test.txt"}


def canonical(task: str) -> str:
    return ALIASES.get(task, task)


def task_dir(root: Path | str, task: str) -> Path:
    """The task's folder under ``root``, trying both spellings; DataError when absent."""
    root = Path(root).expanduser()
    name = canonical(task)
    spellings = [name] + [a for a, c in ALIASES.items() if c == name]
    for s in spellings:
        if (root / s).is_dir():
            return root / s
    if not root.is_dir():
        raise DataError(f"VTAB-1K data root {root} does not exist (set data_root / --data-root)")
    raise DataError(f"VTAB-1K task {task!r}: no folder {' or '.join(str(root / s) for s in spellings)}")


def validate(root: Path | str, task: str, splits: tuple[str, ...] = tuple(LIST_FILES)) -> dict[str, int]:
    """Check the task's list files, labels and image files exist (no decoding); returns split sizes."""
    folder = task_dir(root, task)
    return {s: len(list_file_items(folder / LIST_FILES[s], folder, TASKS[canonical(task)])) for s in splits}


def load_split(root: Path | str, task: str, split: str, size: int, cache: ArtifactCache | None = None) -> Split:
    """One split decoded at ``size`` x ``size``, from the cache when the list file is unchanged."""
    folder = task_dir(root, task)
    list_file = folder / LIST_FILES[split]
    items = list_file_items(list_file, folder, TASKS[canonical(task)])
    key = {"reader": "vtab1k", "folder": str(folder.resolve()), "split": split, "size": size,
           "list": file_stamp(list_file)}
    return cached_split(f"vtab1k-{canonical(task)}-{split}", key, lambda: decode_items(items, size), cache)


def load_task(root: Path | str, task: str, size: int, cache: ArtifactCache | None = None) -> TaskData:
    """All four splits (train800val200 is rebuilt from its own list file, as NOAH's readers do)."""
    if canonical(task) not in TASKS:
        raise DataError(f"unknown VTAB-1K task {task!r}; valid: {', '.join(TASKS)}")
    splits = {s: load_split(root, task, s, size, cache) for s in LIST_FILES}
    return TaskData(canonical(task), TASKS[canonical(task)], splits, "real")

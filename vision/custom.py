"""The ``custom`` vision benchmark: a user's own image folders in NOAH's layout.

Layout: ``<data_root>/<task>/`` holds the list files ``train800.txt``, ``val200.txt`` and ``test.txt``
(``train800val200.txt`` too, else it is the two joined) with lines ``relative/path label``, paths relative
to the task folder, labels 0..K-1. Any folder under ``data_root`` that holds them is a task, named by its
folder; the class count K is read from the labels (the largest label + 1, over every list file). The
split names are NOAH's whatever their sizes: ``select`` trains on train800 and scores val200, ``final``
trains on train800val200 and scores test.

Rows are labelled benchmark ``custom`` with the folder's name as the task, whatever the folder is called:
a folder named ``svhn`` here is ``custom/svhn``, never VTAB's SVHN.
"""

from __future__ import annotations

import re
from pathlib import Path

from harness.cache import ArtifactCache
from harness.errors import ConfigError, DataError
from vision.images import Item, Split, TaskData, cached_split, decode_items, file_stamp, list_file_items

REQUIRED = ("train800", "val200", "test")
OPTIONAL = ("train800val200",)  # the union of train800 and val200 when absent
# A task names rows, folders and cache entries: a plain folder name, nothing that could leave data_root.
TASK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_TASK = re.compile(TASK_PATTERN)


def check_task_name(task: str) -> str:
    """``task`` when it is a plain folder name; a ConfigError saying what is valid otherwise."""
    if not isinstance(task, str) or not _TASK.match(task):
        raise ConfigError(f"custom task {task!r}: a task of the custom benchmark is the name of a folder under "
                          "data_root (1-100 letters, digits, '.', '_' or '-', starting with a letter or digit)")
    return task


def task_folders(root: Path | str) -> list[str]:
    """The folders under ``root`` that hold the required list files: the custom benchmark's tasks there."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and _TASK.match(p.name) and all((p / f"{s}.txt").is_file() for s in REQUIRED))


def task_dir(root: Path | str, task: str) -> Path:
    """The task's folder; a DataError naming the folder and the tasks that are there when it is missing."""
    check_task_name(task)
    root = Path(root).expanduser()
    folder = root / task
    if not folder.is_dir():
        found = task_folders(root)
        raise DataError(f"custom task {task!r}: no folder {folder}; tasks under {root} (folders holding "
                        f"{', '.join(s + '.txt' for s in REQUIRED)}): {', '.join(found) or 'none'}")
    missing = [f"{s}.txt" for s in REQUIRED if not (folder / f"{s}.txt").is_file()]
    if missing:
        raise DataError(f"custom task {task!r}: {folder} lacks the list file(s) {', '.join(missing)} (NOAH's layout: "
                        "lines 'relative/path label' in train800.txt, val200.txt, test.txt)")
    return folder


def _items(folder: Path) -> dict[str, list[Item]]:
    """Every split's items; train800val200 from its own file when present, else train800 + val200."""
    items = {s: list_file_items(folder / f"{s}.txt", folder, None) for s in REQUIRED}
    joined = folder / "train800val200.txt"
    items["train800val200"] = (list_file_items(joined, folder, None) if joined.is_file()
                               else items["train800"] + items["val200"])
    return items


def num_classes(items: dict[str, list[Item]]) -> int:
    """The class count read from the labels: the largest label over every split, plus one."""
    return 1 + max(it.label for split in items.values() for it in split)


def validate(root: Path | str, task: str) -> dict[str, int]:
    """The folder, its list files, labels and images (no decoding): split sizes and the class count."""
    folder = task_dir(root, task)
    items = _items(folder)
    classes = num_classes(items)
    if classes < 2:
        raise DataError(f"custom task {task!r}: the labels of {folder} name {classes} class; a classifier needs "
                        "at least 2 (labels 0..K-1)")
    return {**{s: len(v) for s, v in items.items()}, "classes": classes}


def load_task(root: Path | str, task: str, size: int, cache: ArtifactCache | None = None) -> TaskData:
    """Every split decoded at ``size`` (cached while the list files are unchanged)."""
    folder = task_dir(root, task)
    items = _items(folder)
    classes = num_classes(items)

    def load(split: str) -> Split:
        list_file = folder / f"{split}.txt"
        # a joined split's key names both of its list files, so editing either decodes it again
        stamps = [file_stamp(list_file)] if list_file.is_file() else [
            file_stamp(folder / "train800.txt"), file_stamp(folder / "val200.txt")]
        key = {"reader": "custom", "folder": str(folder.resolve()), "split": split, "size": size, "lists": stamps}
        return cached_split(f"custom-{task}-{split}", key, lambda: decode_items(items[split], size), cache)

    splits = {s: load(s) for s in (*REQUIRED, *OPTIONAL)}
    return TaskData(task, classes, splits, "real", info={"classes": classes})


__all__ = ["TASK_PATTERN", "check_task_name", "load_task", "num_classes", "task_dir", "task_folders", "validate"]

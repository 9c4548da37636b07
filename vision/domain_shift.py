"""Domain shift (GLoRA 3.3): train on ImageNet-1K 16-shot, test on ImageNet val, -V2, -Sketch, -A, -R.

Layout under ``<root>``:
- ``imagenet/train/<wnid>/<image>``: the class list is the sorted wnids found here (1000 for ImageNet);
- ``imagenet/val/<wnid>/``; ``imagenet-v2/<wnid or class index>/`` (the V2 release names folders 0..999);
  ``imagenet-sketch/<wnid>/`` (or ``imagenet-sketch/sketch/<wnid>/``); ``imagenet-a/<wnid>/`` and
  ``imagenet-r/<wnid>/`` (200-class subsets: their wnids map to the 1000-class indices and their scores
  use only those 200 logits, as the benchmarks' own evaluations do).
A test set whose folder is absent is skipped (named in the trial's record); ImageNet val is required.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness.cache import ArtifactCache
from harness.errors import DataError
from vision.images import Item, Split, TaskData, cached_split, decode_items, folder_items, seeded_shots

TASKS = ["imagenet"]
SHOTS = 16
# test set -> (metric suffix, folder spellings)
TEST_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "imagenet": ("imagenet", ("imagenet/val",)),
    "v2": ("v2", ("imagenet-v2", "imagenetv2", "imagenetv2-matched-frequency-format-val")),
    "sketch": ("sketch", ("imagenet-sketch/sketch", "imagenet-sketch", "imagenet_sketch")),
    "a": ("a", ("imagenet-a",)),
    "r": ("r", ("imagenet-r",)),
}
SUBSET_SETS = ("a", "r")  # scored on their own classes only


def classes(root: Path | str) -> list[str]:
    train = Path(root).expanduser() / "imagenet" / "train"
    if not train.is_dir():
        raise DataError(f"domain shift: ImageNet training folder {train} does not exist (expected {train}/<wnid>/)")
    wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not wnids:
        raise DataError(f"domain shift: no class folders under {train}")
    return wnids


def _test_folder(root: Path, name: str) -> Path | None:
    for s in TEST_SETS[name][1]:
        if (root / s).is_dir():
            return root / s
    return None


def _test_items(folder: Path, wnids: list[str], name: str) -> list[Item]:
    index = {w: i for i, w in enumerate(wnids)}
    subs = [p.name for p in folder.iterdir() if p.is_dir()]
    if name == "v2" and subs and all(s.isdigit() for s in subs):
        index = {str(i): i for i in range(len(wnids))}  # the V2 release numbers its class folders
    return folder_items(folder, index, f"domain shift {name}")


def validate(root: Path | str) -> dict[str, int]:
    root = Path(root).expanduser()
    wnids = classes(root)
    out = {"classes": len(wnids)}
    for name in TEST_SETS:
        folder = _test_folder(root, name)
        if folder is None:
            if name == "imagenet":
                raise DataError(f"domain shift: ImageNet val folder {root / 'imagenet/val'} does not exist")
            continue
        out[name] = len(_test_items(folder, wnids, name))
    return out


def load_task(root: Path | str, size: int, seed: int, shots: int = SHOTS,
              cache: ArtifactCache | None = None) -> TaskData:
    root = Path(root).expanduser()
    wnids = classes(root)
    train = folder_items(root / "imagenet" / "train", {w: i for i, w in enumerate(wnids)}, "domain shift train")
    chosen = seeded_shots([it.label for it in train], shots, seed)
    val_idx = seeded_shots([it.label for it in train], 1, seed + 10_007, exclude=set(chosen))

    def load(items: list[Item], what: str) -> Split:
        digest = hashlib.sha256("\n".join(f"{it.path} {it.label}" for it in items).encode()).hexdigest()[:16]
        key = {"reader": "domain_shift", "root": str(root.resolve()), "what": what, "size": size, "items": digest}
        return cached_split(f"imagenet-{what}", key, lambda: decode_items(items, size), cache)

    shot_split = load([train[i] for i in chosen], f"{shots}shot-s{seed}")
    splits = {"train800": shot_split, "train800val200": shot_split,
              "val200": load([train[i] for i in val_idx], f"val-s{seed}")}
    subsets: dict[str, list[int]] = {}
    skipped = []
    for name in TEST_SETS:
        folder = _test_folder(root, name)
        if folder is None:
            if name == "imagenet":
                raise DataError(f"domain shift: ImageNet val folder {root / 'imagenet/val'} does not exist")
            skipped.append(name)
            continue
        split = load(_test_items(folder, wnids, name), f"test-{name}")
        key = "test" if name == "imagenet" else f"test_{name}"
        splits[key] = split
        if name in SUBSET_SETS:
            subsets[key] = sorted(set(split.labels.tolist()))
    return TaskData("imagenet", len(wnids), splits, "real", subsets,
                    info={"shots": shots, "shot_paths": shot_split.paths, "skipped_test_sets": skipped})

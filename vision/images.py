"""Image splits as uint8 tensors: decoding (once, in threads), resizing, and caching in the ArtifactCache.

Every reader (VTAB-1K, few-shot, domain shift, built-in) produces :class:`Split` objects; training only
ever sees tensors, so no image is decoded during a trial.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from harness.cache import ArtifactCache
from harness.errors import DataError

DATA_KIND = "vision-data"
FORMAT_VERSION = 1  # bump when decoding changes, so old cache entries are not reused
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class Item:
    """One image to decode: its file, label and where it was listed (for error messages)."""

    path: Path
    label: int
    where: str  # e.g. "/root/dtd/train800.txt line 12" or the folder it was found in


@dataclass
class Split:
    """Decoded images (uint8, N x 3 x H x W), labels (int64) and the image paths they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: list[int] | torch.Tensor) -> "Split":
        idx = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx], [self.paths[i] for i in idx.tolist()] if self.paths else [])

    @staticmethod
    def concat(parts: list["Split"]) -> "Split":
        return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                     [x for p in parts for x in p.paths])


@dataclass
class TaskData:
    """A task's splits plus its class count. ``class_subsets`` restricts scoring of some test sets to a
    subset of the classes (ImageNet-A and -R use 200 of the 1000)."""

    name: str
    num_classes: int
    splits: dict[str, Split]
    source: str = "real"  # "real" or "synthetic"
    class_subsets: dict[str, list[int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def decode_one(item: Item, size: int) -> torch.Tensor:
    """Decode one image to RGB, resize straight to size x size (bicubic), return uint8 3 x H x W."""
    from PIL import Image

    if not item.path.is_file():
        raise DataError(f"{item.where}: image {item.path} does not exist")
    try:
        with Image.open(item.path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{item.where}: image {item.path} does not decode ({type(e).__name__}: {e})") from e
    return data.view(size, size, 3).permute(2, 0, 1).contiguous()


def decode_items(items: list[Item], size: int, workers: int = 8) -> Split:
    """Decode all ``items`` (threads: PIL releases the GIL while decoding and resizing)."""
    if not items:
        return Split(torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), [])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        images = list(pool.map(lambda it: decode_one(it, size), items))
    return Split(torch.stack(images), torch.tensor([it.label for it in items], dtype=torch.long),
                 [str(it.path) for it in items])


def save_split(split: Split, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({"images": split.images.contiguous(), "labels": split.labels.contiguous()}, str(folder / "split.safetensors"))
    (folder / "paths.json").write_text(json.dumps(split.paths))


def load_split(folder: Path) -> Split:
    from safetensors.torch import load_file

    t = load_file(str(folder / "split.safetensors"))
    return Split(t["images"], t["labels"], json.loads((folder / "paths.json").read_text()))


def cached_split(name: str, key: dict, build: Callable[[], Split], cache: ArtifactCache | None = None) -> Split:
    """The split cached under (``name``, ``key``); ``build`` runs only when it is not cached yet."""
    cache = cache or ArtifactCache()
    art = cache.get_or_build(DATA_KIND, name, {**key, "format": FORMAT_VERSION}, lambda d: save_split(build(), d))
    return load_split(art.path)


def file_stamp(path: Path) -> list:
    """Size and mtime of a file: part of a cache key, so an edited list file is decoded again."""
    st = Path(path).stat()
    return [st.st_size, int(st.st_mtime)]


def folder_items(folder: Path, class_index: dict[str, int], what: str) -> list[Item]:
    """Items from a folder-per-class layout ``folder/<class>/<image>``, classes mapped by ``class_index``."""
    if not folder.is_dir():
        raise DataError(f"{what}: folder {folder} does not exist")
    items: list[Item] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in class_index:
            raise DataError(f"{what}: class folder {sub} is not one of the {len(class_index)} known classes "
                            f"(e.g. {', '.join(list(class_index)[:5])})")
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(f, class_index[sub.name], f"{what} folder {sub}"))
    if not items:
        raise DataError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}/<class>/")
    return items


def list_file_items(list_file: Path, base: Path, num_classes: int | None) -> list[Item]:
    """Items from a list file of ``relative/path label`` lines; bad lines -> DataError naming file and line."""
    if not list_file.is_file():
        raise DataError(f"list file {list_file} does not exist")
    items: list[Item] = []
    inside = base.resolve()
    # utf-8-sig: a list file saved by an editor that starts it with a byte-order mark reads as one without
    for no, line in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_file} line {no}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{where}: expected 'relative/path label', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{where}: label {parts[1]!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise DataError(f"{where}: label {label} is out of range (this task has {num_classes} classes: "
                            f"0..{(num_classes or 0) - 1})")
        path = base / parts[0]
        outside = _outside(parts[0], path, inside)
        if outside:
            raise DataError(f"{where}: image path {parts[0]!r} {outside}, outside the folder {base} the list "
                            "file's paths are relative to; list only images under it (copy or move them there)")
        if not path.is_file():
            raise DataError(f"{where}: image {path} does not exist")
        items.append(Item(path, label, where))
    if not items:
        raise DataError(f"list file {list_file} lists no images")
    return items


def _outside(listed: str, path: Path, inside: Path) -> str | None:
    """How the listed image path leaves the folder ``inside`` (already resolved), or None when it stays in:
    an absolute path, a ``..`` step, or a symbolic link that resolves elsewhere. A list file names images of
    its own dataset; one that reaches elsewhere (``../../home/user/.ssh/id_rsa 0``) would read and cache
    files it has no business with."""
    listed_path = Path(listed)
    if listed_path.is_absolute() or listed.startswith(("/", "\\")):
        return "is absolute"
    if ".." in listed_path.parts or ".." in listed.replace("\\", "/").split("/"):
        return "climbs out with '..'"
    try:
        path.resolve().relative_to(inside)
    except ValueError:
        return f"resolves (through a symbolic link) to {path.resolve()}"
    return None


def seeded_shots(labels: list[int], k: int, seed: int, exclude: set[int] | None = None) -> list[int]:
    """Indices of ``k`` items per class, chosen with ``seed`` (fewer when a class has fewer)."""
    g = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if exclude and i in exclude:
            continue
        by_class.setdefault(int(y), []).append(i)
    chosen: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = torch.randperm(len(idx), generator=g)[:k].tolist()
        chosen.extend(sorted(idx[j] for j in perm))
    return chosen


def split_shot_task(task: str, bases) -> tuple[str, int] | None:
    """``"<base>-<k>shot"`` -> (base, k) when base is one of ``bases``; None when the name is not of that form."""
    base, _, shots = task.rpartition("-")
    if base not in bases or not shots.endswith("shot") or not shots[:-4].isdigit():
        return None
    return base, int(shots[:-4])

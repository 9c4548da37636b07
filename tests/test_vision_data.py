"""Vision readers on tiny folders the tests write: VTAB-1K, few-shot, domain shift; the built-in suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import ConfigError, DataError
from vision import builtin, domain_shift, fewshot, images, vtab


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def _png(path: Path, seed: int, size: int = 20, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)).save(path, fmt)


def write_vtab(root: Path, task: str = "dtd", n_train: int = 8, n_val: int = 4, n_test: int = 6,
               classes: int = 3) -> Path:
    """A NOAH-layout task folder with JPEG images and the four list files."""
    folder = root / task
    lines: dict[str, list[str]] = {}
    k = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            _png(folder / rel, k, fmt="JPEG")
            k += 1
            lines[split].append(f"{rel} {i % classes}")
    (folder / "train800.txt").write_text("\n".join(lines["train"]) + "\n")
    (folder / "val200.txt").write_text("\n".join(lines["val"]) + "\n")
    (folder / "train800val200.txt").write_text("\n".join(lines["train"] + lines["val"]) + "\n")
    (folder / "test.txt").write_text("\n".join(lines["test"]) + "\n")
    return folder


def test_vtab_task_names_and_groups():
    assert len(vtab.TASKS) == 19
    assert sum(len(v) for v in vtab.GROUPS.values()) == 19
    assert [len(vtab.GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert vtab.canonical("cifar100") == "cifar" and vtab.canonical("oxford_pet") == "oxford_iiit_pet"


def test_vtab_reads_resizes_and_caches(tmp_path, monkeypatch):
    write_vtab(tmp_path / "vtab")
    data = vtab.load_task(tmp_path / "vtab", "dtd", 32)
    assert data.num_classes == 47
    assert data.splits["train800"].images.shape == (8, 3, 32, 32)
    assert data.splits["train800"].images.dtype == torch.uint8
    assert len(data.splits["train800val200"]) == 12 and len(data.splits["test"]) == 6
    assert data.splits["test"].labels.tolist() == [0, 1, 2, 0, 1, 2]

    # a rerun reads the cache: decoding must not happen again
    def boom(*a, **k):
        raise AssertionError("decoded twice")

    monkeypatch.setattr(vtab, "decode_items", boom)
    again = vtab.load_task(tmp_path / "vtab", "dtd", 32)
    assert torch.equal(again.splits["test"].images, data.splits["test"].images)


def test_vtab_alias_folder(tmp_path):
    write_vtab(tmp_path / "vtab", task="cifar100")
    assert vtab.task_dir(tmp_path / "vtab", "cifar").name == "cifar100"
    assert vtab.validate(tmp_path / "vtab", "cifar")["test"] == 6


def test_vtab_missing_list_file(tmp_path):
    folder = write_vtab(tmp_path / "vtab")
    (folder / "val200.txt").unlink()
    with pytest.raises(DataError, match=r"val200\.txt does not exist"):
        vtab.validate(tmp_path / "vtab", "dtd")


def test_vtab_missing_image_names_file_and_line(tmp_path):
    folder = write_vtab(tmp_path / "vtab")
    (folder / "images/test/000002.jpg").unlink()
    with pytest.raises(DataError, match=r"test\.txt line 3: image .*000002\.jpg does not exist"):
        vtab.validate(tmp_path / "vtab", "dtd")


def test_vtab_label_out_of_range(tmp_path):
    folder = write_vtab(tmp_path / "vtab")
    lines = (folder / "train800.txt").read_text().splitlines()
    lines[4] = lines[4].split()[0] + " 47"  # dtd has 47 classes: 0..46
    (folder / "train800.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train800\.txt line 5: label 47 is out of range"):
        vtab.validate(tmp_path / "vtab", "dtd")


def test_vtab_image_that_does_not_decode(tmp_path):
    folder = write_vtab(tmp_path / "vtab")
    (folder / "images/val/000001.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"val200\.txt line 2: image .*000001\.jpg does not decode"):
        vtab.load_task(tmp_path / "vtab", "dtd", 16)


def test_vtab_missing_task_folder(tmp_path):
    (tmp_path / "vtab").mkdir()
    with pytest.raises(DataError, match="no folder .*kitti"):
        vtab.validate(tmp_path / "vtab", "kitti")


def write_fewshot(root: Path, dataset: str = "food101", classes: int = 3, per_class: int = 5) -> Path:
    folder = root / dataset
    k = 0
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            for i in range(n):
                _png(folder / split / f"class_{c}" / f"{i}.png", k)
                k += 1
    return folder


def test_fewshot_folder_layout_seeded_shots(tmp_path):
    write_fewshot(tmp_path / "fs")
    a = fewshot.load_task(tmp_path / "fs", "food101-2shot", 16, seed=0)
    b = fewshot.load_task(tmp_path / "fs", "food101-2shot", 16, seed=0)
    c = fewshot.load_task(tmp_path / "fs", "food101-2shot", 16, seed=1)
    assert a.num_classes == 3 and len(a.splits["train800"]) == 6
    assert sorted(a.splits["train800"].labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert a.info["shot_paths"] == b.info["shot_paths"]  # seeded, recorded
    assert a.info["shot_paths"] != c.info["shot_paths"]
    # selection images come from train but never overlap the shots
    assert not set(a.splits["val200"].paths) & set(a.info["shot_paths"])
    assert len(a.splits["test"]) == 6


def test_fewshot_list_layout_and_errors(tmp_path):
    folder = tmp_path / "fs" / "oxford_pets"
    for i in range(6):
        _png(folder / "img" / f"{i}.png", i)
    (folder / "train.txt").write_text("".join(f"img/{i}.png {i % 2}\n" for i in range(4)))
    (folder / "test.txt").write_text("img/4.png 0\nimg/5.png 1\n")
    data = fewshot.load_task(tmp_path / "fs", "oxford_pets-1shot", 16, seed=3)
    assert data.num_classes == 2 and len(data.splits["train800"]) == 2
    (folder / "test.txt").write_text("img/4.png 0\nimg/5.png 7\n")
    with pytest.raises(DataError, match=r"test\.txt line 2: label 7 is out of range"):
        fewshot.validate(tmp_path / "fs", "oxford_pets-1shot")
    with pytest.raises(ConfigError, match="food101-4shot"):
        fewshot.parse_task("food-4shots")


def write_imagenet(root: Path, wnids=("n01", "n02", "n03", "n04"), per_class: int = 3) -> None:
    k = 0
    for w in wnids:
        for i in range(per_class):
            _png(root / "imagenet" / "train" / w / f"{i}.JPEG", k, fmt="JPEG")
            k += 1
        _png(root / "imagenet" / "val" / w / "v.png", k)
        k += 1
    for i, w in enumerate(wnids):  # V2 numbers its class folders
        _png(root / "imagenet-v2" / str(i) / "a.png", 100 + i)
    for w in wnids[1:3]:  # A: a class subset
        _png(root / "imagenet-a" / w / "a.png", 200 + k)
        k += 1


def test_domain_shift_reader(tmp_path):
    write_imagenet(tmp_path / "ds")
    data = domain_shift.load_task(tmp_path / "ds", 16, seed=0, shots=2)
    assert data.num_classes == 4 and len(data.splits["train800"]) == 8
    assert len(data.splits["test"]) == 4
    assert data.splits["test_v2"].labels.tolist() == [0, 1, 2, 3]
    assert data.class_subsets["test_a"] == [1, 2]  # wnids mapped to the train folder's indices
    assert set(data.info["skipped_test_sets"]) == {"sketch", "r"}


def test_domain_shift_unknown_class_folder(tmp_path):
    write_imagenet(tmp_path / "ds")
    _png(tmp_path / "ds" / "imagenet-r" / "n99" / "x.png", 1)
    with pytest.raises(DataError, match="n99"):
        domain_shift.validate(tmp_path / "ds")


def test_builtin_suite_is_deterministic_and_balanced():
    assert len(builtin.TASKS) >= 8
    assert set(builtin.GROUPS) == {"natural", "specialized", "structured"}
    for task, (_g, classes, _r) in builtin.TASKS.items():
        s = builtin.generate_split(task, "val200", seed=0)
        assert s.images.shape == (200, 3, builtin.NATIVE, builtin.NATIVE) and s.images.dtype == torch.uint8
        assert int(s.labels.min()) >= 0 and int(s.labels.max()) < classes
        assert len(set(s.labels.tolist())) == classes
    a = builtin.generate_split("count", "val200", seed=0)
    b = builtin.generate_split("count", "val200", seed=0)
    c = builtin.generate_split("count", "val200", seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # digits: different scikit-learn images in each split
    d_train = builtin.generate_split("digits", "train800")
    assert d_train.images.shape[0] == 800


def test_builtin_variants():
    fs = builtin.load_task("builtin-fewshot", "shapes-2shot", seed=0)
    assert len(fs.splits["train800"]) == 12 and fs.info["shots"] == 2
    sh = builtin.load_task("builtin-shift", "digits", seed=0)
    assert {"test", "test_sketch", "test_noise", "test_recolor"} <= set(sh.splits)
    assert torch.equal(sh.splits["test"].labels, sh.splits["test_sketch"].labels)
    assert not torch.equal(sh.splits["test"].images, sh.splits["test_sketch"].images)
    full = builtin.load_task("builtin", "location")
    assert len(full.splits["train800val200"]) == 1000 and full.source == "synthetic"


def test_seeded_shots_helper():
    labels = [0, 1] * 10
    a = images.seeded_shots(labels, 3, seed=5)
    assert len(a) == 6 and a == images.seeded_shots(labels, 3, seed=5)

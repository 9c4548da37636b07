"""The built-in offline suite: deterministic procedurally generated tasks mirroring VTAB-1K's three groups.

SYNTHETIC DATA. Nothing is downloaded: the digits come from the 8x8 copy that scikit-learn ships, every
other image is drawn with numpy from a seeded generator, so the same seed always gives the same tensors.

Each task has VTAB's splits (train800, val200, train800val200 = both, test of 500 images), rendered at
``NATIVE`` (32) pixels and resized to the backbone's input by the trial. Variants:
- few-shot (benchmark ``builtin-fewshot``): tasks ``<task>-<k>shot``, k images per class drawn with the
  trial's seed from train800; selection scores val200, the final run scores test;
- domain shift (benchmark ``builtin-shift``): 16 shots per class of the clean rendering, tested on the
  clean test set (``top1``) and on the same test images rendered as sketches (``top1_sketch``), under
  heavy noise (``top1_noise``) and in other colours (``top1_recolor``).
The difficulty (clutter, noise, jitter, overlapping class cues) is set so that no task is at 100% and a
linear probe stays clearly below fine-tuning.

At CPU scale (a tiny ViT at 32 px, 200 updates of batch 32, ~20 s a trial) textures, cells and distance
are the learnable ones (full fine-tuning ~50-60% top-1 vs a linear probe ~35-48%); landcover is nearly
solved by a linear probe (~88%), and shapes, digits, location, orientation and count stay near chance
for every method at 200-300 updates: they need GPU-scale budgets.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from harness.cache import ArtifactCache
from harness.errors import ConfigError
from vision.images import Split, TaskData, cached_split, seeded_shots, split_shot_task

NATIVE = 32
VERSION = 1  # bump when any renderer changes: cache keys include it
SIZES = {"train800": 800, "val200": 200, "test": 500}
SHOTS = (1, 2, 4, 8, 16)
SHIFT_SHOTS = 16
STYLES = ("sketch", "noise", "recolor")

_Y, _X = np.mgrid[0:NATIVE, 0:NATIVE].astype(np.float32)
_Y = (_Y + 0.5) / NATIVE * 2 - 1  # pixel centres in [-1, 1]
_X = (_X + 0.5) / NATIVE * 2 - 1


# --- drawing helpers ---------------------------------------------------------------------------------
def _rot(cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    u, v = _X - cx, _Y - cy
    return c * u + s * v, -s * u + c * v


def shape_mask(kind: int, cx: float, cy: float, size: float, angle: float = 0.0) -> np.ndarray:
    """Boolean mask of shape ``kind`` (0 circle, 1 square, 2 triangle, 3 cross, 4 ring, 5 diamond, 6 arrow)."""
    u, v = _rot(cx, cy, angle)
    r = np.hypot(u, v)
    if kind == 0:
        return r < size
    if kind == 1:
        return np.maximum(np.abs(u), np.abs(v)) < size * 0.85
    if kind == 2:
        return (v < size * 0.6) & (np.abs(u) < (v + size) * 0.6)
    if kind == 3:
        return ((np.abs(u) < size * 0.3) & (np.abs(v) < size)) | ((np.abs(v) < size * 0.3) & (np.abs(u) < size))
    if kind == 4:
        return (r < size) & (r > size * 0.55)
    if kind == 5:
        return np.abs(u) + np.abs(v) < size
    if kind == 6:  # an arrow pointing along +u: orientation is unambiguous over 360 degrees
        head = (u > 0) & (u < size) & (np.abs(v) < (size - u) * 0.8)
        shaft = (u <= 0) & (u > -size) & (np.abs(v) < size * 0.22)
        return head | shaft
    raise ValueError(kind)


def _colour(rng: np.random.Generator, lo: int = 40, hi: int = 255) -> np.ndarray:
    return rng.integers(lo, hi, size=3).astype(np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 1.0) -> None:
    img[mask] = (1 - alpha) * img[mask] + alpha * colour


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise: a coarse random grid upsampled bilinearly to NATIVE x NATIVE, in [0, 1]."""
    g = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    return torch.nn.functional.interpolate(g, size=(NATIVE, NATIVE), mode="bilinear", align_corners=False)[0, 0].numpy()


def _background(rng: np.random.Generator, clutter: int = 0) -> np.ndarray:
    base = _colour(rng, 0, 140)
    img = np.empty((NATIVE, NATIVE, 3), np.float32)
    img[:] = base
    img += (_smooth_noise(rng, 4)[..., None] - 0.5) * rng.uniform(20, 90)
    for _ in range(clutter):  # thin random lines and small blobs as distractors
        if rng.random() < 0.5:
            a = rng.uniform(0, np.pi)
            u, v = _rot(rng.uniform(-1, 1), rng.uniform(-1, 1), a)
            _paint(img, (np.abs(v) < 0.05) & (np.abs(u) < rng.uniform(0.2, 0.8)), _colour(rng), 0.7)
        else:
            _paint(img, shape_mask(0, rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.05, 0.12)),
                   _colour(rng), 0.7)
    return img


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# --- the tasks ---------------------------------------------------------------------------------------
def r_textures(rng: np.random.Generator, y: int) -> np.ndarray:
    """8 pattern families: stripes at 3 angles, checkerboard, dot grid, rings, blobs, waves."""
    f = rng.uniform(2.5, 6.0)
    ph = rng.uniform(0, 2 * np.pi)
    jitter = rng.uniform(-0.35, 0.35)
    u, v = _rot(rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), jitter)
    if y == 0:
        p = np.sin(np.pi * f * v + ph)
    elif y == 1:
        p = np.sin(np.pi * f * u + ph)
    elif y == 2:
        p = np.sin(np.pi * f * (u + v) * 0.7 + ph)
    elif y == 3:
        p = np.sin(np.pi * f * u * 0.6 + ph) * np.sin(np.pi * f * v * 0.6)
    elif y == 4:
        p = (np.cos(np.pi * f * u) * np.cos(np.pi * f * v)) ** 8 * 2 - 1
    elif y == 5:
        p = np.sin(np.pi * f * np.hypot(u, v) + ph)
    elif y == 6:
        p = _smooth_noise(rng, int(rng.integers(4, 9))) * 2 - 1
    else:
        p = np.sin(np.pi * f * v + 1.2 * np.sin(np.pi * f * 0.7 * u) + ph)
    a, b = _colour(rng, 0, 255), _colour(rng, 0, 255)
    w = (p[..., None] + 1) / 2
    img = a * w + b * (1 - w)
    return _finish(img, rng, rng.uniform(15, 45))


def r_shapes(rng: np.random.Generator, y: int) -> np.ndarray:
    """6 shapes (circle, square, triangle, cross, ring, diamond) in clutter, any colour, place and angle."""
    img = _background(rng, clutter=int(rng.integers(2, 7)))
    size = rng.uniform(0.25, 0.5)
    cx, cy = rng.uniform(-1 + size, 1 - size, size=2)
    _paint(img, shape_mask(y, cx, cy, size, rng.uniform(0, 2 * np.pi)), _colour(rng), rng.uniform(0.6, 1.0))
    return _finish(img, rng, rng.uniform(10, 35))


_DIGITS: tuple[np.ndarray, np.ndarray] | None = None


def _digits() -> tuple[np.ndarray, np.ndarray]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images.astype(np.float32) / 16.0, d.target.astype(np.int64))
    return _DIGITS


def r_digit(rng: np.random.Generator, image8: np.ndarray) -> np.ndarray:
    """An 8x8 scikit-learn digit, scaled to 16-28 px, placed anywhere, coloured, on a noisy background."""
    side = int(rng.integers(16, 29))
    t = torch.from_numpy(image8)[None, None]
    big = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
    big = np.clip(big, 0, 1)
    img = _background(rng, clutter=int(rng.integers(0, 4)))
    ox, oy = rng.integers(0, NATIVE - side + 1, size=2)
    fg = _colour(rng)
    region = img[oy:oy + side, ox:ox + side]
    img[oy:oy + side, ox:ox + side] = region * (1 - big[..., None]) + fg * big[..., None]
    return _finish(img, rng, rng.uniform(15, 40))


def r_cells(rng: np.random.Generator, y: int) -> np.ndarray:
    """Microscopy-like fields of 4-10 cells: small round, large round, elongated, or ring with nucleus."""
    img = np.empty((NATIVE, NATIVE, 3), np.float32)
    img[:] = np.array([230, 200, 215], np.float32) + rng.normal(0, 12, 3)
    img += (_smooth_noise(rng, 5)[..., None] - 0.5) * 40
    stain = np.array([150, 60, 140], np.float32) + rng.normal(0, 25, 3)
    for _ in range(int(rng.integers(4, 11))):
        cx, cy = rng.uniform(-0.9, 0.9, size=2)
        if y == 0:
            m = shape_mask(0, cx, cy, rng.uniform(0.07, 0.13))
        elif y == 1:
            m = shape_mask(0, cx, cy, rng.uniform(0.15, 0.24))
        elif y == 2:
            u, v = _rot(cx, cy, rng.uniform(0, np.pi))
            a = rng.uniform(0.2, 0.3)
            m = (u / a) ** 2 + (v / (a * rng.uniform(0.3, 0.45))) ** 2 < 1
        else:
            s = rng.uniform(0.13, 0.22)
            m = shape_mask(4, cx, cy, s) | shape_mask(0, cx, cy, s * 0.25)
        _paint(img, m, stain + rng.normal(0, 15, 3), rng.uniform(0.5, 0.9))
    blur = torch.from_numpy(img).permute(2, 0, 1)[None]
    blur = torch.nn.functional.avg_pool2d(blur, 3, 1, 1, count_include_pad=False)[0].permute(1, 2, 0).numpy()
    return _finish(blur, rng, rng.uniform(10, 25))


def r_landcover(rng: np.random.Generator, y: int) -> np.ndarray:
    """5 land-cover classes seen from above: water, forest, fields, urban, sand dunes (colours jittered)."""
    jitter = rng.normal(0, 25, 3)
    if y == 0:
        n = _smooth_noise(rng, 3)
        u, v = _rot(0, 0, rng.uniform(0, np.pi))
        p = 0.3 * np.sin(v * rng.uniform(8, 14) + rng.uniform(0, 6)) + n
        img = np.array([30, 70, 140], np.float32) + p[..., None] * np.array([20, 40, 60], np.float32)
    elif y == 1:
        n = _smooth_noise(rng, int(rng.integers(8, 14)))
        img = np.array([30, 90, 35], np.float32) + (n[..., None] - 0.5) * np.array([50, 90, 40], np.float32)
    elif y == 2:
        img = np.zeros((NATIVE, NATIVE, 3), np.float32)
        cut = rng.integers(8, 24, size=2)
        for i, (ys, xs) in enumerate([(slice(0, cut[0]), slice(0, cut[1])), (slice(0, cut[0]), slice(cut[1], None)),
                                      (slice(cut[0], None), slice(0, cut[1])), (slice(cut[0], None), slice(cut[1], None))]):
            c = np.array([rng.uniform(90, 190), rng.uniform(110, 190), rng.uniform(30, 90)], np.float32)
            a = rng.uniform(0, np.pi)
            u, v = _rot(0, 0, a)
            stripes = 0.5 + 0.5 * np.sin(v * rng.uniform(10, 20))
            img[ys, xs] = (c * (0.75 + 0.25 * stripes[..., None]))[ys, xs]
    elif y == 3:
        img = np.empty((NATIVE, NATIVE, 3), np.float32)
        img[:] = np.array([120, 120, 120], np.float32)
        step = int(rng.integers(5, 9))
        off = rng.integers(0, step, size=2)
        for yy in range(-step, NATIVE, step):
            for xx in range(-step, NATIVE, step):
                if rng.random() < 0.75:
                    h, w = rng.integers(2, step, size=2)
                    y0, x0 = yy + off[0], xx + off[1]
                    img[max(0, y0):max(0, y0 + h), max(0, x0):max(0, x0 + w)] = rng.uniform(60, 220, 3)
    else:
        u, v = _rot(0, 0, rng.uniform(0, np.pi))
        dunes = np.sin(v * rng.uniform(5, 10) + 0.8 * _smooth_noise(rng, 3) * 6)
        img = np.array([200, 170, 120], np.float32) + dunes[..., None] * np.array([25, 22, 15], np.float32)
    img = img + jitter
    if rng.random() < 0.5:  # thin clouds
        img = img * 0.7 + 255 * 0.3 * _smooth_noise(rng, 3)[..., None]
    return _finish(img, rng, rng.uniform(10, 30))


def _single_object(rng: np.random.Generator, cx: float, cy: float, size: float, angle: float,
                   kind: int | None = None, clutter: int = 2) -> np.ndarray:
    img = _background(rng, clutter=clutter)
    kind = int(rng.integers(0, 6)) if kind is None else kind
    _paint(img, shape_mask(kind, cx, cy, size, angle), _colour(rng, 120, 255), rng.uniform(0.7, 1.0))
    return img


def r_location(rng: np.random.Generator, y: int) -> np.ndarray:
    """dSprites-style location: which of 3x3 grid cells holds the object's centre (9 classes)."""
    gx, gy = y % 3, y // 3
    cx = -1 + (gx + rng.uniform(0.1, 0.9)) * 2 / 3
    cy = -1 + (gy + rng.uniform(0.1, 0.9)) * 2 / 3
    img = _single_object(rng, cx, cy, rng.uniform(0.12, 0.25), rng.uniform(0, 2 * np.pi), clutter=3)
    return _finish(img, rng, rng.uniform(15, 35))


def r_orientation(rng: np.random.Generator, y: int) -> np.ndarray:
    """dSprites-style orientation: an arrow's direction in 8 bins of 45 degrees (jittered inside the bin)."""
    angle = (y + rng.uniform(-0.4, 0.4)) * np.pi / 4
    cx, cy = rng.uniform(-0.4, 0.4, size=2)
    img = _single_object(rng, cx, cy, rng.uniform(0.35, 0.55), angle, kind=6, clutter=2)
    return _finish(img, rng, rng.uniform(15, 35))


def r_count(rng: np.random.Generator, y: int) -> np.ndarray:
    """CLEVR-style counting: 1 to 6 objects (6 classes), mixed shapes, sizes and colours."""
    img = _background(rng, clutter=0)
    placed: list[tuple[float, float]] = []
    while len(placed) < y + 1:
        c = tuple(rng.uniform(-0.8, 0.8, size=2))
        if all(np.hypot(c[0] - p[0], c[1] - p[1]) > 0.32 for p in placed):
            placed.append(c)
    for cx, cy in placed:
        _paint(img, shape_mask(int(rng.integers(0, 6)), cx, cy, rng.uniform(0.1, 0.17), rng.uniform(0, 6.3)),
               _colour(rng, 120, 255), rng.uniform(0.75, 1.0))
    return _finish(img, rng, rng.uniform(15, 35))


def r_distance(rng: np.random.Generator, y: int) -> np.ndarray:
    """KITTI/CLEVR-dist style: an object's distance bin (4 classes) from its size and height on a ground plane."""
    d = (y + rng.uniform(0.0, 1.0)) / 4  # 0 near .. 1 far
    size = 0.55 - 0.4 * d + rng.normal(0, 0.03)
    cy = 0.7 - 1.1 * d + rng.normal(0, 0.08)
    img = np.empty((NATIVE, NATIVE, 3), np.float32)
    horizon = (_Y < -0.45 + rng.normal(0, 0.05))[..., None]
    img[:] = np.where(horizon, _colour(rng, 100, 230), _colour(rng, 20, 120))
    img += (_smooth_noise(rng, 6)[..., None] - 0.5) * 40
    _paint(img, shape_mask(int(rng.integers(0, 6)), rng.uniform(-0.6, 0.6), cy, max(size, 0.08), rng.uniform(0, 6.3)),
           _colour(rng, 80, 255), 1.0)
    return _finish(img, rng, rng.uniform(15, 35))


# name -> (group, classes, renderer); digits render from scikit-learn images (see generate_split)
TASKS: dict[str, tuple[str, int, Callable | None]] = {
    "textures": ("natural", 8, r_textures),
    "shapes": ("natural", 6, r_shapes),
    "digits": ("natural", 10, None),
    "cells": ("specialized", 4, r_cells),
    "landcover": ("specialized", 5, r_landcover),
    "location": ("structured", 9, r_location),
    "orientation": ("structured", 8, r_orientation),
    "count": ("structured", 6, r_count),
    "distance": ("structured", 4, r_distance),
}
GROUPS: dict[str, list[str]] = {g: [t for t, (gg, _, _) in TASKS.items() if gg == g]
                                for g in ("natural", "specialized", "structured")}
FEWSHOT_BASE = ["textures", "shapes", "digits", "cells", "landcover"]
FEWSHOT_TASKS = [f"{t}-{k}shot" for t in FEWSHOT_BASE for k in SHOTS]
SHIFT_TASKS = list(TASKS)


# --- styles for the domain-shift variant ----------------------------------------------------------------
def restyle(img: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """The same image in another style: a pencil sketch of its edges, heavy noise, or other colours."""
    x = img.astype(np.float32)
    if style == "sketch":
        g = x.mean(-1)
        gx = np.zeros_like(g)
        gy = np.zeros_like(g)
        gx[:, 1:-1] = g[:, 2:] - g[:, :-2]
        gy[1:-1] = g[2:] - g[:-2]
        e = np.hypot(gx, gy)
        e = e / (np.percentile(e, 98) + 1e-6)
        paper = 245 - 180 * np.clip(e, 0, 1)
        return np.clip(np.repeat(paper[..., None], 3, -1) + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
    if style == "noise":
        x = x + rng.normal(0, 60, x.shape)
        x[rng.random(x.shape[:2]) < 0.1] = rng.uniform(0, 255, 3)
        return np.clip(x, 0, 255).astype(np.uint8)
    if style == "recolor":
        return (255 - x[..., rng.permutation(3)]).clip(0, 255).astype(np.uint8)
    raise ValueError(style)


# --- splits --------------------------------------------------------------------------------------------
def _task_index(task: str) -> int:
    return list(TASKS).index(task)


def generate_split(task: str, split: str, seed: int = 0, style: str | None = None) -> Split:
    """Render one split deterministically: the generator is seeded by (seed, task, split), labels balanced."""
    if task not in TASKS:
        raise ConfigError(f"unknown built-in task {task!r}; valid: {', '.join(TASKS)}")
    n = SIZES[split]
    _group, classes, render = TASKS[task]
    split_id = list(SIZES).index(split)
    rng = np.random.default_rng([seed, _task_index(task), split_id])
    style_rng = np.random.default_rng([seed, _task_index(task), split_id, 1 + STYLES.index(style)]) if style else None
    images = np.empty((n, NATIVE, NATIVE, 3), np.uint8)
    if task == "digits":
        pics, targets = _digits()
        order = np.random.default_rng([seed, 999]).permutation(len(targets))  # disjoint images per split
        start = {"train800": 0, "val200": 800, "test": 1000}[split]
        idx = order[start:start + n]
        labels = targets[idx]
        for i, j in enumerate(idx):
            images[i] = r_digit(rng, pics[j])
    else:
        labels = rng.permutation(np.arange(n) % classes)
        for i, y in enumerate(labels):
            images[i] = render(rng, int(y))
    if style_rng is not None:
        for i in range(n):
            images[i] = restyle(images[i], style, style_rng)
    names = [f"builtin://{task}/{split}{'-' + style if style else ''}/{i:06d}" for i in range(n)]
    return Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels.astype(np.int64)),
                 names)


def load_split(task: str, split: str, seed: int = 0, style: str | None = None,
               cache: ArtifactCache | None = None) -> Split:
    key = {"reader": "builtin", "version": VERSION, "task": task, "split": split, "seed": seed, "style": style}
    name = f"builtin-{task}-{split}{'-' + style if style else ''}"
    return cached_split(name, key, lambda: generate_split(task, split, seed, style), cache)


def parse_fewshot(task: str) -> tuple[str, int]:
    parsed = split_shot_task(task, TASKS)
    if parsed is None:
        raise ConfigError(f"built-in few-shot task {task!r}: expected <task>-<k>shot, e.g. shapes-4shot; "
                          f"valid: {', '.join(FEWSHOT_TASKS)}")
    return parsed


def _shots(split: Split, k: int, seed: int) -> Split:
    return split.subset(seeded_shots(split.labels.tolist(), k, seed))


def load_task(benchmark: str, task: str, seed: int = 0, data_seed: int = 0,
              cache: ArtifactCache | None = None) -> TaskData:
    """A built-in task for ``benchmark`` (builtin, builtin-fewshot, builtin-shift); ``seed`` draws the shots."""
    if benchmark == "builtin":
        splits = {s: load_split(task, s, data_seed, cache=cache) for s in SIZES}
        splits["train800val200"] = Split.concat([splits["train800"], splits["val200"]])
        return TaskData(task, TASKS[task][1], splits, "synthetic")
    if benchmark == "builtin-fewshot":
        base, k = parse_fewshot(task)
        shots = _shots(load_split(base, "train800", data_seed, cache=cache), k, seed)
        splits = {"train800": shots, "train800val200": shots, "val200": load_split(base, "val200", data_seed, cache=cache),
                  "test": load_split(base, "test", data_seed, cache=cache)}
        return TaskData(task, TASKS[base][1], splits, "synthetic", info={"shots": k, "shot_paths": shots.paths})
    if benchmark == "builtin-shift":
        shots = _shots(load_split(task, "train800", data_seed, cache=cache), SHIFT_SHOTS, seed)
        splits = {"train800": shots, "train800val200": shots, "val200": load_split(task, "val200", data_seed, cache=cache),
                  "test": load_split(task, "test", data_seed, cache=cache)}
        for style in STYLES:
            splits[f"test_{style}"] = load_split(task, "test", data_seed, style, cache=cache)
        return TaskData(task, TASKS[task][1], splits, "synthetic", info={"shots": SHIFT_SHOTS, "shot_paths": shots.paths})
    raise ConfigError(f"not a built-in benchmark: {benchmark!r}")

"""Vision data on tensors: the data sits on the device as uint8, batches are sliced from it and normalised
on the fly (no decoding, no DataLoader); the epoch schedule; top-1 evaluation. The training loop itself is
the harness's one loop (``harness/training.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from harness.training import autocast
from vision.images import Split


IGNORE_LABEL = -100  # a padded row's label: no loss, no gradient (torch's cross-entropy default)


@dataclass
class DeviceSplit:
    """A split moved to the device once, resized to the backbone input; batches are normalised floats."""

    images: torch.Tensor  # uint8 N x 3 x S x S on the device (or CPU when too big, moved per batch)
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device

    @staticmethod
    def make(split: Split, size: int, mean, std, device: torch.device, max_bytes: float = 4e9) -> "DeviceSplit":
        imgs = split.images
        on = device if imgs.numel() * (size / max(1, imgs.shape[-1])) ** 2 < max_bytes else torch.device("cpu")
        imgs = imgs.to(on)
        if imgs.shape[-1] != size or imgs.shape[-2] != size:
            # resize straight to the backbone input (bicubic), in chunks to bound memory
            out = []
            for i in range(0, imgs.shape[0], 512):
                x = F.interpolate(imgs[i:i + 512].float(), size=(size, size), mode="bicubic", align_corners=False)
                out.append(x.round().clamp(0, 255).to(torch.uint8))
            imgs = torch.cat(out) if out else imgs.new_zeros(0, 3, size, size)
        m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        return DeviceSplit(imgs, split.labels.to(device), m, s, device)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (normalised images, labels) of ``idx``. With ``pad_to``, a shorter batch (an epoch's last) is
        filled up to that many rows with repeats of its first image labelled :data:`IGNORE_LABEL`, which
        :func:`classification_loss` leaves out of the loss and its mean: the same update as the short batch,
        in the shape of every other one, so a compiled step compiles (and records its CUDA graphs) once."""
        labels = self.labels[idx.to(self.labels.device)]
        short = 0 if pad_to is None else pad_to - len(idx)
        if short > 0 and len(idx):
            idx = torch.cat([idx, idx[:1].expand(short)])
            labels = torch.cat([labels, labels.new_full((short,), IGNORE_LABEL)])
        x = self.images[idx.to(self.images.device)].to(self.device, non_blocking=True).float()
        return (x - self.mean) / self.std, labels


def schedule(n_train: int, budget) -> tuple[int, int, int, int]:
    """(total updates, warm-up updates, batch size, updates per epoch) from a budget of epochs (or a
    ``steps`` cap, to which the warm-up is rescaled)."""
    bs = min(int(budget.batch_size), n_train)
    per_epoch = max(1, math.ceil(n_train / bs))
    total = per_epoch * int(budget.epochs)
    warmup = per_epoch * int(budget.warmup_epochs)
    if budget.steps:
        warmup = int(round(warmup * budget.steps / max(1, total)))
        total = int(budget.steps)
    return total, min(warmup, max(0, total - 1)), bs, per_epoch


def batches(n: int, bs: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs of index batches (an epoch's last, short batch is kept; a compiled step
    pads it to the batch size with ignored rows, :meth:`DeviceSplit.batch`)."""
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            yield perm[i:i + bs]


@torch.no_grad()
def predict(model: nn.Module, data: DeviceSplit, bs: int = 256, classes: list[int] | None = None) -> torch.Tensor:
    """Predicted labels; with ``classes``, only those logits compete (ImageNet-A/-R's 200-class subsets)."""
    was = model.training
    model.eval()
    out = []
    sub = torch.as_tensor(classes, device=data.device) if classes is not None else None
    for i in range(0, len(data), bs):
        x, _ = data.batch(torch.arange(i, min(i + bs, len(data))))
        with autocast(data.device):
            logits = model(x).float()
        if sub is not None:
            pred = sub[logits[:, sub].argmax(-1)]
        else:
            pred = logits.argmax(-1)
        out.append(pred)
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=data.device)


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the model's logits (in fp32, also under autocast) on an (images, labels) batch,
    averaged over the rows whose label is not :data:`IGNORE_LABEL` (a padded batch's filler)."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y, ignore_index=IGNORE_LABEL)


def top1(model: nn.Module, data: DeviceSplit, bs: int = 256, classes: list[int] | None = None) -> float:
    """Top-1 accuracy in percent."""
    if len(data) == 0:
        return float("nan")
    pred = predict(model, data, bs, classes)
    return float((pred == data.labels).float().mean()) * 100.0

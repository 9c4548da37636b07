"""Adapter targets, including slices of a fused q/k/v Linear.

timm's ViTs and the harness's Decision Transformer keep the query, key and value projections in one
``qkv`` Linear (rows: all of q, then k, then v). The papers adapt q and v alone (LoRA, EigenLoRA on ViT),
which one Linear cannot express: an adapter on it shares one A across q, k and v and trains k too.

A target whose last part is ``q``, ``k`` or ``v`` and whose rest names a fused ``qkv`` Linear (``qkv.q``,
``attn.qkv.v``) is a *slice target*. :func:`prepare_model` replaces each fused Linear that a slice target
names by :class:`SplitQKV`, which holds three plain Linears ``q``, ``k``, ``v`` cut from the fused weight's
rows and concatenates their outputs (numerically the fused layer). The slice targets then match the new
Linears by the ordinary name-suffix rule (``blocks.0.attn.qkv.q``), so every method, peft-backed or our
own, adapts them as plain Linears and counts exactly what the papers count. Without a slice target the
model is left as it is. Save, load and merge need no special case: a fresh base split from the same
targets has the same module names.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from harness.errors import ConfigError

SLICES: tuple[str, ...] = ("q", "k", "v")
FUSED_NAME = "qkv"  # the last name part of a fused query/key/value Linear (timm and agents/dt.py)


class SplitQKV(nn.Module):
    """A fused q/k/v Linear as three Linears; ``forward`` returns what the fused layer returned."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        if fused.out_features % 3:
            raise ConfigError(f"a fused qkv Linear needs 3 equal output blocks; this one has {fused.out_features} "
                              "outputs")
        d = fused.out_features // 3
        self.in_features, self.out_features = fused.in_features, fused.out_features
        kw = dict(device=fused.weight.device, dtype=fused.weight.dtype)
        for i, name in enumerate(SLICES):
            part = nn.Linear(fused.in_features, d, bias=fused.bias is not None, **kw)
            if fused.weight.device.type != "meta":
                with torch.no_grad():
                    part.weight.copy_(fused.weight[i * d:(i + 1) * d])
                    if fused.bias is not None:
                        part.bias.copy_(fused.bias[i * d:(i + 1) * d])
            part.weight.requires_grad_(fused.weight.requires_grad)
            if part.bias is not None:
                part.bias.requires_grad_(fused.bias.requires_grad)
            self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def parse_targets(value: str | Sequence[str]) -> tuple[str, ...]:
    """Targets as a tuple of names, from a list or a comma-joined string (``"qkv.q,qkv.v"``)."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise ConfigError(f"adapter targets {value!r}: expected module names, e.g. 'qkv.q,qkv.v' or "
                          "['fc1', 'fc2']; an empty name is not allowed")
    return tuple(dict.fromkeys(names))


def join_targets(targets: Iterable[str]) -> str:
    """The record form: names comma-joined as the study gave them."""
    return ",".join(targets)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def slice_of(target: str) -> tuple[str, str] | None:
    """(fused-layer target, slice) for a slice target such as ``attn.qkv.v``; None for a plain target."""
    head, _, last = target.rpartition(".")
    if last in SLICES and head and head.rpartition(".")[2] == FUSED_NAME:
        return head, last
    return None


def _fused_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] == FUSED_NAME and m.out_features % 3 == 0]


def _choices(model: nn.Module, head: Sequence[str]) -> list[str]:
    """Short target names the model offers: the last two name parts of each Linear, and the slices."""
    found: dict[str, None] = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and not any(_matches(n, h) or n.startswith(h + ".") for h in head):
            found[".".join(n.split(".")[-2:])] = None
            if n.rpartition(".")[2] == FUSED_NAME:
                found.update({f"{FUSED_NAME}.{s}": None for s in SLICES})
    return list(found)


def check_targets(model: nn.Module, targets: Sequence[str], head: Sequence[str] = ()) -> None:
    """Every target names a Linear of ``model`` or a slice of a fused qkv Linear (meta models work too);
    a study may not name a fused layer and a slice of it at once. The error lists the valid names."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, SplitQKV) for m in model.modules()):
        linears += [n for n, m in model.named_modules() if isinstance(m, SplitQKV)]
    fused = [n for n, _ in _fused_linears(model)] + [n for n, m in model.named_modules() if isinstance(m, SplitQKV)]
    for t in targets:
        sliced = slice_of(t)
        if sliced is not None:
            ok = any(_matches(n, sliced[0]) for n in fused) or any(_matches(n, t) for n in linears)
        else:
            ok = any(_matches(n, t) for n in linears)
        if not ok:
            raise ConfigError(f"adapter targets: {t!r} names no Linear of the model; valid names include "
                              f"{', '.join(_choices(model, head))} (a slice of a fused layer: qkv.q, qkv.k, qkv.v)")
    for t in targets:
        sliced = slice_of(t)
        if sliced is not None and sliced[0] in targets:
            raise ConfigError(f"adapter targets name both the fused layer {sliced[0]!r} and its slice {t!r}; "
                              f"give either {sliced[0]!r} (q, k and v together) or the slices "
                              f"({', '.join(f'{sliced[0]}.{s}' for s in SLICES)})")


def prepare_model(model: nn.Module, targets: Sequence[str], head: Sequence[str] = ()) -> list[str]:
    """Check ``targets`` and split each fused qkv Linear that a slice target names, in place.

    Returns the names of the split layers (empty when no slice is named, the model untouched).
    """
    check_targets(model, targets, head)
    wanted = [s[0] for s in map(slice_of, targets) if s is not None]
    if not wanted:
        return []
    split = []
    for name, layer in _fused_linears(model):
        if any(_matches(name, w) for w in wanted):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, SplitQKV(layer))
            split.append(name)
    return split


def is_split(model: nn.Module) -> bool:
    """Whether any fused qkv layer of ``model`` is split."""
    return any(isinstance(m, SplitQKV) for m in model.modules())


__all__ = ["FUSED_NAME", "SLICES", "SplitQKV", "check_targets", "is_split", "join_targets", "parse_targets",
           "prepare_model", "slice_of"]

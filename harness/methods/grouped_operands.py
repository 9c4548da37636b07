"""Eager forwards of adapted layers that prepare their operands together, one batched product per kind.

An eager step of a method that builds each adapted layer's factors or effective weight from its parameters
(NoLA's mixtures of bases, EigenLoRA's components, GLoRA's gated terms, AdaLoRA's ``A * E``) is bound by the
host: some 25 us per dispatched operation with its autograd node on an H200's host, against microseconds
of device work (BENCHMARKS.md, issue 21). Same-shape layers (12 per shape on ViT-B) can build theirs in one
stacked product instead of twelve. A layer class opts in through :class:`GroupsOperands`; the model gets a
:class:`GroupedOperands` forward pre-hook, which prepares the operands before each eager forward and hands
each layer its own. Compiled steps are left alone: inductor fuses them, and graphs replay without the host.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch
from torch import nn

# Whether an eager forward prepares the operands of same-shape layers together. ``bench methods --set
# grouped=false`` turns it off for a GPU A/B in one run.
GROUPED_EAGER = True


class GroupsOperands:
    """What a layer class implements to have its operands prepared in groups: ``group_key``,
    ``group_operands`` (and optionally ``before_groups``); its forward starts with ``take_operands()``."""

    # what the model's forward pre-hook prepared for this layer's next forward; None: nothing
    _operands: Any = None

    def group_key(self) -> Hashable | None:
        """Layers with equal keys (not None) can have their operands prepared together by
        :meth:`group_operands`; None (the default): this layer prepares its own, in its forward."""
        return None

    @classmethod
    def group_operands(cls, layers: Sequence[Any]) -> Sequence[Any]:
        """For layers of one :meth:`group_key`, in module order: what each one's forward would compute
        before its input is touched (factors, an effective weight), computed for all of them at once."""
        raise NotImplementedError(f"{cls.__name__} does not group its operands")

    @classmethod
    def before_groups(cls, layers: Sequence[Any]) -> None:
        """Called by the pre-hook with every layer of this class in the model, in module order, before
        any group's :meth:`group_operands`: for work that must follow module order (GLoRA's draws)."""

    @classmethod
    def groups_operands(cls) -> bool:
        """Whether this class implements :meth:`group_operands` (a model of it then needs the pre-hook)."""
        return cls.group_operands.__func__ is not GroupsOperands.group_operands.__func__

    def take_operands(self) -> Any:
        """The operands prepared for this forward by the model's pre-hook, handed out once; None when there
        are none (the layer computes its own) and always while compiling."""
        if torch.compiler.is_compiling():
            return None
        ops = self._operands
        if ops is not None:
            self._operands = None
        return ops


class GroupedOperands:
    """Forward pre-hook of a model whose ``kind`` layers group their operands: before an eager forward it
    prepares, for each set of layers with one ``group_key``, what their forwards would each compute alone.

    It finds the layers at each call, so a merge, a load or a move of the model needs no bookkeeping; it
    does nothing while compiling, or with :data:`GROUPED_EAGER` off.
    """

    def __init__(self, kind: type[GroupsOperands]):
        self.kind = kind

    def __call__(self, model: nn.Module, args: Any) -> None:
        if not GROUPED_EAGER or torch.compiler.is_compiling():
            return
        layers = [m for m in model.modules() if isinstance(m, self.kind)]
        if not layers:
            return
        groups: dict[Hashable, list[GroupsOperands]] = {}
        for layer in layers:
            layer._operands = None  # nothing from an earlier forward that a layer did not reach
            key = layer.group_key()
            if key is not None:
                groups.setdefault(key, []).append(layer)
        if groups:
            self.kind.before_groups(layers)
        for members in groups.values():
            if len(members) > 1:
                for layer, ops in zip(members, type(members[0]).group_operands(members), strict=True):
                    layer._operands = ops

"""The shared base of the own methods (NoLA, GLoRA, EigenLoRA): adapters that replace targeted Linears.

Each own method replaces every targeted ``nn.Linear`` with a subclass of :class:`AdaptedLinear` that keeps
the original layer (frozen) as ``base`` and adds the tensors it declares in ``adapter_tensors``. A
:class:`LinearAdapterMethod` supplies the whole life cycle around such a layer class:

    wrap:  build = layer_factory(model, site, settings, ctx)   (checks settings; the model is untouched)
           -> adapt(model, site, build): freeze, replace_linears, unfreeze the head
    save:  <name>.safetensors (each layer's declared tensors, the head as ``head::<name>``),
           save_extra (method-specific JSON), method.json
    load:  rebuild (default: wrap) -> the saved tensors, strictly checked -> load_extra
    merge: merge_linears: each layer's effective weight and bias in a plain ``nn.Linear``

A subclass declares ``layer_class`` and implements ``layer_factory``; the rest is optional.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from harness.errors import ConfigError
from harness.methods.grouped_operands import GroupedOperands, GroupsOperands
from harness.methods.base import (AdapterSite, Method, MethodContext, freeze, head_state, load_head_state,
                                  unfreeze_head, write_settings)

LayerBuilder = Callable[[str, nn.Linear], "AdaptedLinear"]


class AdaptedLinear(GroupsOperands, nn.Module):
    """A frozen ``nn.Linear`` (``self.base``) plus a method's adapter; subclasses define the update.

    ``adapter_tensors`` names the attributes (parameters or buffers) a save keeps and a load requires;
    anything else (NoLA's bases, regenerated from the seed) is rebuilt by the method, never saved. A class
    whose eager forward builds factors or weights from its parameters may group that work across
    same-shape layers (:class:`~harness.methods.grouped_operands.GroupsOperands`); ``adapt`` then adds the
    model's pre-hook.
    """

    adapter_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads ``layer.weight`` (dtype/device probes); give it the frozen base weight.
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def merged_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (weight, bias) of the plain Linear whose output equals this module's (eval mode)."""
        raise NotImplementedError(f"{type(self).__name__} is abstract: an adapter layer implements merged_weight_bias()")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The declared tensors (``adapter_tensors``), by name: what a save keeps of this layer."""
        return {n: getattr(self, n) for n in self.adapter_tensors}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def target_layers(model: nn.Module, site: AdapterSite) -> list[tuple[str, nn.Linear]]:
    """The site's targeted Linears, without any that belong to the task head (trained fully, never adapted)."""
    found = [(n, m) for n, m in site.target_linears(model) if not site.is_head_param(n + ".weight")]
    if not found:
        raise ConfigError(f"every nn.Linear matching the adapter targets {list(site.targets)} is part of the "
                          f"task head {list(site.head)}; nothing is left to adapt")
    return found


def replace_linears(model: nn.Module, site: AdapterSite, build: LayerBuilder) -> list[str]:
    """Replace each targeted Linear ``name`` by ``build(name, linear)``; returns the names, in module order."""
    names = []
    for name, linear in target_layers(model, site):
        parent, child = _parent(model, name)
        setattr(parent, child, build(name, linear))
        names.append(name)
    return names


def adapted_modules(model: nn.Module, kind: type = AdaptedLinear) -> Iterator[tuple[str, AdaptedLinear]]:
    """(name, module) of every ``kind`` layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


@torch.no_grad()
def merge_linears(model: nn.Module) -> nn.Module:
    """Fold every :class:`AdaptedLinear` into a plain ``nn.Linear``, in place; returns ``model``.

    The merged layer always has a bias: GLoRA and others may add one where the base had none.
    """
    for name, module in list(adapted_modules(model)):
        weight, bias = module.merged_weight_bias()
        base = module.base
        plain = nn.Linear(base.in_features, base.out_features, bias=True,
                          device=base.weight.device, dtype=base.weight.dtype)
        plain.weight.copy_(weight.to(base.weight.dtype))
        if bias is None:
            plain.bias.zero_()
        else:
            plain.bias.copy_(bias.to(base.weight.dtype))
        plain.weight.requires_grad_(False)
        plain.bias.requires_grad_(False)
        parent, child = _parent(model, name)
        setattr(parent, child, plain)
    return model


def save_adapter_tensors(model: nn.Module, site: AdapterSite, path: Path) -> None:
    """Write each adapted layer's declared tensors (``<module>.<tensor>``) and the head (``head::<name>``)."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for name, module in adapted_modules(model):
        for tname, t in module.adapter_state().items():
            state[f"{name}.{tname}"] = t.detach().cpu().contiguous()
    for name, t in head_state(model, site).items():
        state[f"head::{name}"] = t
    save_file(state, str(path))


def load_adapter_tensors(model: nn.Module, site: AdapterSite, path: Path, strict: bool = True) -> None:
    """Copy tensors saved by :func:`save_adapter_tensors` into ``model`` (already wrapped).

    ``strict``: every declared tensor of every adapted layer must be in the file.
    """
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = {k[len("head::"):]: v for k, v in state.items() if k.startswith("head::")}
    own = {k: v for k, v in state.items() if not k.startswith("head::")}
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    unknown = [k for k in own if k not in targets]
    if unknown:
        raise ConfigError(f"{path}: saved tensors {unknown[:3]} do not exist in the wrapped model; "
                          "was it saved from another base model or other settings?")
    if strict:
        expected = {f"{n}.{t}" for n, m in adapted_modules(model) for t in m.adapter_tensors}
        missing = sorted(expected - set(own))
        if missing:
            raise ConfigError(f"{path}: the saved adapter lacks {missing[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            if targets[k].shape != v.shape:
                raise ConfigError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(targets[k].shape)}")
            targets[k].copy_(v.to(targets[k].device, targets[k].dtype))
    load_head_state(model, site, head)


class LinearAdapterMethod(Method):
    """A method that swaps each targeted Linear for a ``layer_class`` layer; see the module docstring."""

    layer_class: ClassVar[type[AdaptedLinear]] = AdaptedLinear

    @property
    def state_file(self) -> str:
        """The safetensors file of a save; saved adapters on disk are found by this name."""
        return f"{self.name}.safetensors"

    def layers(self, model: nn.Module) -> list[tuple[str, AdaptedLinear]]:
        """(name, layer) of this method's adapted layers in ``model``, in module order."""
        return list(adapted_modules(model, self.layer_class))

    # --- wrap ---------------------------------------------------------------------------------------
    def layer_factory(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any],
                      ctx: MethodContext) -> LayerBuilder:
        """The ``build(name, linear)`` that makes each targeted layer's adapter.

        It runs before the model is changed, so it is where a method raises ConfigError for settings the
        model cannot take (ranks too large, an empty bank): a failed wrap leaves the model as it was.
        """
        raise NotImplementedError(f"{type(self).__name__} is abstract: a linear-adapter method implements "
                                  "layer_factory()")

    def wrap(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], ctx: MethodContext) -> nn.Module:
        return self.adapt(model, site, self.layer_factory(model, site, settings, ctx))

    def adapt(self, model: nn.Module, site: AdapterSite, build: LayerBuilder) -> nn.Module:
        """Freeze ``model``, replace each targeted Linear by ``build(name, linear)``, unfreeze the head."""
        freeze(model)
        replace_linears(model, site, build)
        unfreeze_head(model, site)
        if self.layer_class.groups_operands():
            model.register_forward_pre_hook(GroupedOperands(self.layer_class))
        return model

    # --- save / load --------------------------------------------------------------------------------
    def save(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter_tensors(model, site, folder / self.state_file)
        self.save_extra(model, folder)
        write_settings(folder, self.name, settings)

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        """Write what the tensors do not hold (GLoRA's subnet, EigenLoRA's facts) into ``folder``."""

    def load(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path,
             ctx: MethodContext | None = None) -> nn.Module:
        folder = Path(folder)
        wrapped = self.rebuild(model, site, settings, folder, ctx or MethodContext())
        load_adapter_tensors(wrapped, site, folder / self.state_file)
        self.load_extra(wrapped, folder)
        return wrapped

    def rebuild(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path,
                ctx: MethodContext) -> nn.Module:
        """The adapted model, before the saved tensors are copied in; by default a fresh ``wrap``."""
        return self.wrap(model, site, settings, ctx)

    def load_extra(self, model: nn.Module, folder: Path) -> None:
        """Read back what :meth:`save_extra` wrote."""

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_linears(model)

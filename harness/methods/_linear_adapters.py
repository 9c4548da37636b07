"""Shared plumbing for the own methods (NoLA, GLoRA, EigenLoRA): swap targeted Linears for adapter modules.

Each own method replaces every targeted ``nn.Linear`` with a subclass of :class:`AdaptedLinear` that keeps
the original layer (frozen) as ``base`` and adds its own tensors. Merging asks each wrapper for its
effective weight and bias and writes them into a plain ``nn.Linear`` in the wrapper's place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from harness.errors import ConfigError
from harness.methods.base import AdapterSite, head_state, load_head_state


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``self.base``) plus a method's adapter; subclasses define the update."""

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
        """The tensors a save must keep (parameters and persistent buffers), the frozen base excluded."""
        return {n: t for n, t in self.state_dict(keep_vars=True).items() if not n.startswith("base.")}


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


def replace_linears(model: nn.Module, site: AdapterSite,
                    build: Callable[[str, nn.Linear], AdaptedLinear]) -> list[str]:
    """Replace each targeted Linear ``name`` by ``build(name, linear)``; returns the names, in module order."""
    names = []
    for name, linear in target_layers(model, site):
        parent, child = _parent(model, name)
        setattr(parent, child, build(name, linear))
        names.append(name)
    return names


def adapted_modules(model: nn.Module, kind: type = AdaptedLinear) -> Iterator[tuple[str, AdaptedLinear]]:
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


def save_adapter_tensors(model: nn.Module, site: AdapterSite, path: Path,
                         include: Callable[[str, AdaptedLinear, str], bool] | None = None) -> None:
    """Write each adapted module's tensors (``<module>.<tensor>``) and the head (``head::<name>``) to ``path``.

    ``include(module_name, module, tensor_name)`` can leave more tensors out (non-persistent buffers,
    such as NoLA's regenerated bases, are never saved).
    """
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for name, module in adapted_modules(model):
        for tname, t in module.adapter_state().items():
            if include is None or include(name, module, tname):
                state[f"{name}.{tname}"] = t.detach().cpu().contiguous()
    for name, t in head_state(model, site).items():
        state[f"head::{name}"] = t
    save_file(state, str(path))


def load_adapter_tensors(model: nn.Module, site: AdapterSite, path: Path, strict: bool = True) -> None:
    """Copy tensors saved by :func:`save_adapter_tensors` into ``model`` (already wrapped)."""
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
        expected = {f"{n}.{t}" for n, m in adapted_modules(model) for t in m.adapter_state()}
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

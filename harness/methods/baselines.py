"""The two baselines: full fine-tuning and the linear probe (head only)."""

from __future__ import annotations

from typing import Any

from torch import nn

from harness.methods.base import AdapterSite, Method, MethodContext, freeze, unfreeze_head


class FullFineTuning(Method):
    name = "full"
    summary = "full fine-tuning: every weight trains"
    settings = {}
    takes_targets = False

    def wrap(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class LinearProbe(Method):
    name = "linear"
    summary = "linear probe: only the task head trains"
    settings = {}
    takes_targets = False

    def wrap(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], ctx: MethodContext) -> nn.Module:
        freeze(model)
        unfreeze_head(model, site)
        return model

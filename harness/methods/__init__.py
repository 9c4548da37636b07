"""The method registry: every adapter method, shared by both tracks, under the names sweeps use."""

from __future__ import annotations

import importlib

from harness.errors import ConfigError, choices_message
from harness.methods.base import AdapterSite, Method, MethodContext, Setting

# name -> "module:Class"; imported lazily so that listing methods stays cheap.
REGISTRY: dict[str, str] = {
    "full": "harness.methods.baselines:FullFineTuning",
    "linear": "harness.methods.baselines:LinearProbe",
    "lora": "harness.methods.peft_methods:LoRA",
    "dora": "harness.methods.peft_methods:DoRA",
    "pissa": "harness.methods.peft_methods:PiSSA",
    "olora": "harness.methods.peft_methods:OLoRA",
    "adalora": "harness.methods.peft_methods:AdaLoRA",
    "eva": "harness.methods.peft_methods:EVA",
    "eva-dora": "harness.methods.peft_methods:EVADoRA",
    "vera": "harness.methods.peft_methods:VeRA",
    "randlora": "harness.methods.peft_methods:RandLoRA",
    "nola": "harness.methods.nola:NoLA",
    "glora": "harness.methods.glora:GLoRA",
    "eigenlora": "harness.methods.eigenlora:EigenLoRA",
}

_cache: dict[str, Method] = {}


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; unknown names fail listing the valid ones."""
    if name not in REGISTRY:
        raise ConfigError(choices_message("method", name, method_names()))
    if name not in _cache:
        module, cls = REGISTRY[name].split(":")
        _cache[name] = getattr(importlib.import_module(module), cls)()
    return _cache[name]


__all__ = ["AdapterSite", "Method", "MethodContext", "Setting", "REGISTRY", "get_method", "method_names"]

"""The method registry: every adapter method, shared by both tracks, under the names sweeps use."""

from __future__ import annotations

import importlib
import re

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


# A label after "@" names a variant of a method, so one study can hold it more than once and the
# leaderboard shows each variant as its own row (GLoRA's three parameter budgets: glora@0.29M, ...).
VARIANT_SEP = "@"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")


def base_name(name: str) -> str:
    """The registered method behind ``name`` (``glora@0.29M`` -> ``glora``)."""
    return name.split(VARIANT_SEP, 1)[0]


def get_method(name: str) -> Method:
    """The registered method ``name`` (or ``method@label``, a labelled variant of it); unknown names fail
    listing the valid ones."""
    if VARIANT_SEP in name:
        label = name.split(VARIANT_SEP, 1)[1]
        if not _LABEL.match(label):
            raise ConfigError(f"method {name!r}: the variant label after '@' must be 1-40 letters, digits, '.', '_' "
                              "or '-' (starting with a letter or digit), e.g. 'glora@0.29M'")
        name = base_name(name)
    if name not in REGISTRY:
        raise ConfigError(choices_message("method", name, method_names()))
    if name not in _cache:
        module, cls = REGISTRY[name].split(":")
        _cache[name] = getattr(importlib.import_module(module), cls)()
    return _cache[name]


__all__ = ["AdapterSite", "Method", "MethodContext", "Setting", "REGISTRY", "base_name", "get_method", "method_names"]

"""The method registry: every adapter method, shared by both tracks, under the names sweeps use."""

from __future__ import annotations

import importlib
import re

from harness.errors import ConfigError, HarnessError, choices_message
from harness.methods.base import AdapterSite, Method, MethodContext, Setting, check_settings

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
        _cache[name] = load_entry(name, REGISTRY[name])
    return _cache[name]


def load_entry(name: str, target: str) -> Method:
    """The method a registry entry ``name: "module:Class"`` names, checked as it is loaded: the name is a
    plain one, the module imports, the class exists there, is a :class:`Method` whose ``name`` is ``name``,
    and its settings' defaults fit their kinds (:func:`harness.methods.base.check_settings`). A broken entry
    is a ConfigError naming it; a module that imports but lacks one of its own dependencies stays an
    ImportError (``python -m harness methods`` lists that method as not available)."""
    import difflib

    entry = f"method registry entry {name!r}: {target!r}"
    if not isinstance(name, str) or not _LABEL.match(name):
        raise ConfigError(f"{entry}: the name must be 1-40 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (it names rows and files)")
    module_name, sep, cls_name = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not module_name or not cls_name.isidentifier():
        raise ConfigError(f"{entry}: expected 'package.module:ClassName', e.g. "
                          "'harness.methods.peft_methods:LoRA'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # The entry's own module (or a package on its path) is missing: a misspelt entry, not a missing extra.
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"{entry}: there is no module {e.name!r}") from None
        raise
    except HarnessError as e:  # a declaration the method's module refused as it was defined
        raise ConfigError(f"{entry}: {e}") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = [k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, Method) and v is not Method]
        close = difflib.get_close_matches(cls_name, found, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; its methods: {', '.join(sorted(found)) or 'none'}"
        raise ConfigError(f"{entry}: module {module_name!r} has no class {cls_name!r}{hint}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"{entry}: {cls_name!r} is not a subclass of harness.methods.Method")
    if cls.name != name:
        raise ConfigError(f"{entry}: the class's name is {cls.name!r}; a method is registered under its own "
                          f"name (set {cls_name}.name = {name!r} or register it as {cls.name!r})")
    check_settings(name, cls.settings)  # also for a class that bypassed __init_subclass__
    return cls()


__all__ = ["AdapterSite", "Method", "MethodContext", "Setting", "REGISTRY", "base_name", "get_method", "load_entry",
           "method_names"]

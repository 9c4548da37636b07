"""The method registry: every adapter method, shared by both tracks, under the names sweeps use."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from harness import plugins
from harness.errors import ConfigError, choices_message

if TYPE_CHECKING:
    from harness.methods.base import AdapterSite, Method, MethodContext, Setting

# The method interface (harness/methods/base.py) imports torch; the registry itself does not, so the sweep
# file's schema, the driver and the command line look names up without torch. The interface's names are
# still importable from here (``from harness.methods import Method``): loaded on first use.
_INTERFACE = ("AdapterSite", "Method", "MethodContext", "Setting")


def __getattr__(name: str) -> Any:
    if name in _INTERFACE:
        from harness.methods import base  # heavy: the method interface imports torch

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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

# The names the project ships: a plugin may take one only when it says so (register_method(replace=True)).
BUILTIN: frozenset[str] = frozenset(REGISTRY)

_cache: dict[str, Method] = {}
_entry_points_read = False


def method_names() -> list[str]:
    """Every registered method: the project's, then those of installed entry points and loaded plugins."""
    _read_entry_points()
    return list(REGISTRY)


M = TypeVar("M", bound=type)


def register_method(name: str | None = None, *, replace: bool = False) -> Callable[[M], M]:
    """Class decorator: register a :class:`Method` subclass under ``name`` (default: its ``name``).

    Checked here, where the method is defined: the name is a plain one (see
    :func:`harness.plugins.check_name`), the class is a Method whose ``name`` agrees (an empty ``name`` is
    set to ``name``), its settings' defaults fit their kinds (:func:`~harness.methods.base.check_settings`),
    and the name is not already taken by another class; taking a built-in name needs ``replace=True``. A
    refused registration is a ConfigError. Registering the same class again (its module imported twice)
    changes nothing.

    A plugin module holding decorated methods is named in a sweep file's ``plugins`` list (or
    ``--plugin``) or in an installed package's ``harness.methods`` entry points, so that Ray's workers
    import it too (:mod:`harness.plugins`).
    """
    def decorate(cls: M) -> M:
        add_method(cls, name, replace=replace)
        return cls

    return decorate


def add_method(cls: type, name: str | None = None, *, replace: bool = False) -> Method:
    """Register ``cls`` (see :func:`register_method`) and return its instance."""
    from harness.methods.base import Method, check_settings  # heavy: the method interface imports torch

    where = f"method class {getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s}"
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls is Method:
        raise ConfigError(f"{where}: register_method takes a subclass of harness.methods.Method")
    name = name if name is not None else cls.name
    plugins.check_name("method", name, where)
    if cls.name and cls.name != name:
        raise ConfigError(f"{where}: registered as {name!r} but its name is {cls.name!r}; a method is registered "
                          f"under its own name (set name = {name!r} or register it as {cls.name!r})")
    target = f"{cls.__module__}:{cls.__qualname__}"
    _read_entry_points()
    if name in REGISTRY and REGISTRY[name] != target and not replace:
        owner = "a built-in method" if name in BUILTIN else "another method"
        raise ConfigError(f"{where}: the name {name!r} is already taken by {owner} ({REGISTRY[name]}); choose "
                          "another name, or pass register_method(..., replace=True) to replace it deliberately")
    check_settings(name, cls.settings)  # also for a class that bypassed __init_subclass__
    cls.name = name
    if REGISTRY.get(name) == target and isinstance(_cache.get(name), cls):
        return _cache[name]
    REGISTRY[name] = target
    _cache[name] = cls()
    return _cache[name]


def _read_entry_points() -> None:
    """Installed packages' ``harness.methods`` entry points, once per process (workers included):
    ``name = "pkg.module:Class"`` is registered lazily (checked by :func:`load_entry` when first used);
    ``name = "pkg.module"`` is imported, its decorators registering what it holds."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True  # before importing: a plugin's own decorators come back here
    plugins.register_entry_points("method", plugins.METHOD_GROUP, REGISTRY)


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
    _read_entry_points()
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

    from harness.methods.base import Method, check_settings  # heavy: the method interface imports torch

    entry = f"method registry entry {name!r}: {target!r}"
    if not isinstance(name, str) or not _LABEL.match(name):
        raise ConfigError(f"{entry}: the name must be 1-40 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (it names rows and files)")
    module_name, sep, cls_name = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not module_name or not cls_name.isidentifier():
        raise ConfigError(f"{entry}: expected 'package.module:ClassName', e.g. "
                          "'harness.methods.peft_methods:LoRA'")
    module = plugins.import_entry_module(entry, module_name)
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


__all__ = ["AdapterSite", "BUILTIN", "Method", "MethodContext", "Setting", "REGISTRY", "add_method", "base_name",
           "get_method", "load_entry", "method_names", "register_method"]

"""Extension without a fork: methods and tracks from outside the project.

Two ways in, both checked as they load (a broken plugin is a :class:`~harness.errors.ConfigError` naming
it, before Ray starts, never a traceback):

- **Modules named by the user**: ``plugins: [mypkg.methods]`` at a sweep file's top level, or
  ``--plugin mypkg.methods`` on ``python -m harness run / methods / tasks``. Importing the module runs its
  ``@register_method`` / ``@register_track`` decorators. A sweep imports them in the driver before the
  file is validated and again in every Ray worker before its trial runs (the driver passes the list in the
  trial's config): a worker imports the harness afresh, so a registration made only in the driver's
  process would be unknown there.
- **Installed packages' entry points**: group ``harness.methods`` (or ``harness.tracks``), each entry
  ``name = "package.module:Class"`` (registered lazily under ``name``, the class checked when first
  used) or ``name = "package.module"`` (a module whose decorators register what it holds). They are read
  once per process, the first time the registry is asked for its names, in workers too.

This module knows nothing of methods or tracks themselves; their registries (``harness/methods``,
``harness/tracks.py``) call it.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from types import ModuleType
from typing import Iterable

from harness.errors import ConfigError, HarnessError

METHOD_GROUP = "harness.methods"
TRACK_GROUP = "harness.tracks"

# A dotted module path (``mypkg.methods``): what a sweep file's ``plugins`` list and --plugin take.
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
# A registered name: it names rows, folders and files, so nothing that could leave them.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$"
_MODULE = re.compile(MODULE_PATTERN)
_NAME = re.compile(NAME_PATTERN)

_loaded: list[str] = []  # plugin modules imported in this process, in order


def check_name(kind: str, name: object, where: str) -> str:
    """``name`` when it is a plain registered name (1-40 letters, digits, '.', '_', '-', starting with a
    letter or digit, no '@' since that marks a method's variant); a ConfigError naming ``where`` otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: the {kind} name {name!r} must be 1-40 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit (it names rows, folders and files)")
    return name


def load_plugins(modules: Iterable[str], where: str = "plugins") -> list[str]:
    """Import each plugin module (once per process); returns the modules newly imported.

    A module that is not found, or that fails while importing (a registration the registry refused, a
    syntax error, a missing dependency of its own), is a ConfigError naming it and ``where`` it was named.
    """
    new = []
    for module in modules:
        if not isinstance(module, str) or not _MODULE.match(module):
            raise ConfigError(f"{where}: {module!r} is not a module path; expected a dotted name such as "
                              "'mypkg.methods' (the module must be importable: installed, or on PYTHONPATH)")
        if module in _loaded:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                raise ConfigError(f"{where}: plugin module {module!r} was not found (is it installed, or its "
                                  "folder on PYTHONPATH, on every machine of the sweep?)") from None
            raise ConfigError(f"{where}: plugin module {module!r} failed to import: {e}") from None
        except HarnessError as e:  # a registration the registry refused
            raise ConfigError(f"{where}: plugin module {module!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - whatever a third party's module raises, name the module
            raise ConfigError(f"{where}: plugin module {module!r} failed to import: "
                              f"{type(e).__name__}: {e}") from None
        _loaded.append(module)
        new.append(module)
    return new


def loaded_plugins() -> list[str]:
    """The plugin modules this process imported through :func:`load_plugins`."""
    return list(_loaded)


def import_entry_module(entry: str, module_name: str) -> ModuleType:
    """The module a registry entry (``entry``, named in errors) points to. A missing module of the entry's
    own path is a misspelt entry, and a declaration the module refuses as it is imported is the entry's
    error: both ConfigErrors naming the entry. A module that imports but lacks a dependency of its own
    stays an ImportError (the registrant is then "not available")."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"{entry}: there is no module {e.name!r}") from None
        raise
    except HarnessError as e:  # a declaration the module refused as it was defined (a bad setting default)
        raise ConfigError(f"{entry}: {e}") from None


def register_entry_points(kind: str, group: str, registry: dict[str, str]) -> None:
    """Installed packages' entry points of ``group`` into ``registry`` (name -> 'module:Class'): an entry
    naming a bare module is imported (its decorators register what it holds); a ``module:Class`` entry is
    recorded under its checked name, and a name the registry already gives another value is a ConfigError."""
    for name, value in entry_points(group):
        where = f"entry point {name!r} = {value!r} (group {group!r})"
        if ":" not in value:
            load_plugins([value], where)
            continue
        check_name(kind, name, where)
        if registry.get(name, value) != value:
            raise ConfigError(f"{where}: the {kind} name {name!r} is already taken ({registry[name]}); rename the "
                              f"entry point (a built-in {kind} is replaced only by register_{kind}(replace=True))")
        registry[name] = value


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, value) of every installed entry point in ``group``, sorted by name; a name two packages both
    claim is a ConfigError naming the values."""
    found: dict[str, str] = {}
    for ep in metadata.entry_points(group=group):
        if ep.name in found and found[ep.name] != ep.value:
            raise ConfigError(f"entry points of group {group!r}: {ep.name!r} is claimed twice "
                              f"({found[ep.name]!r} and {ep.value!r}); uninstall one of the packages")
        found[ep.name] = ep.value
    return sorted(found.items())


__all__ = ["METHOD_GROUP", "MODULE_PATTERN", "NAME_PATTERN", "TRACK_GROUP", "check_name", "entry_points",
           "import_entry_module", "load_plugins", "loaded_plugins", "register_entry_points"]

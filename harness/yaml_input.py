"""Reading YAML the user gives (sweep files, ``--set`` values) strictly: one meaning per document.

``yaml.safe_load`` silently keeps the last of two equal keys in a mapping (``seeds: [0]`` then
``seeds: [1]`` runs ``[1]``) and lets a few hundred bytes of nested aliases expand into millions of
values, which validation and its messages would then walk. Here a repeated key is an error naming it and
its lines, and a document that expands past :data:`MAX_VALUES` values is refused before anything reads it.
"""

from __future__ import annotations

from typing import Any

import yaml

from harness.errors import ConfigError

MAX_VALUES = 100_000  # scalars and containers in one document, aliases expanded; the paper sweeps have < 1,000


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a repeated key."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # the mapping's own keys: one a merge (<<) brings in may be overridden
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                                  "YAML would silently keep the last: keep one")
            seen[key] = line
        except TypeError:  # an unhashable key: SafeLoader's own error says so below
            continue
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _check_size(value: Any, source: str) -> None:
    """Count the values of ``value`` with aliases expanded, stopping as soon as the count passes the limit."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{source}: expands to more than {MAX_VALUES:,} values (nested YAML aliases?); a sweep "
                              "file needs far fewer: write the values out")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_yaml(text: str, source: str) -> Any:
    """The YAML document ``text`` (from ``source``, named in errors), strictly: repeated keys and documents
    that expand past :data:`MAX_VALUES` values are ConfigErrors."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _check_size(value, source)
    return value

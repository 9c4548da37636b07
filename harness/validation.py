"""One validation path for every setting the harness takes: pydantic models, one error format.

Track settings, budgets, method settings and sweep files are all pydantic models; :func:`validate`
turns a raw mapping into a model instance or raises :class:`ConfigError` with one line per problem,
each naming the key, the bad value and what is valid. The field types below keep YAML's meaning:
integers and booleans are strict (``r: true`` is not a rank), numbers accept integers and numeric
strings (``--set lr=1e-4`` arrives from YAML as a string).
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import AllowInfNan, BaseModel, BeforeValidator, Strict, ValidationError

from harness.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_number), AllowInfNan(False)]  # .inf / .nan are no learning rate
# torch.compile's modes that a compiled training step may use (harness.training.compiled_loss): default,
# reduce-overhead (the step replayed as CUDA graphs), max-autotune-no-cudagraphs
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def mode_needs_compile(setting: str, mode: str, compile: bool | None) -> str:
    """``mode`` (a :data:`CompileMode` setting named ``setting``), refused where ``compile`` is off: a mode
    other than ``default`` only applies to compiled steps."""
    if mode != "default" and compile is False:
        raise ValueError(f"{mode} applies to compiled steps only: set compile: true as well, or leave "
                         f"{setting} out")
    return mode

_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a mapping", "none_required": "null", "model_type": "a mapping", "model_attributes_type": "a mapping",
}


MAX_SHOWN = 120  # characters of a bad value shown in a message: a value may be megabytes (YAML aliases)


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} characters)"


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}"
    if kind == "string_pattern_mismatch":
        return ("expected a plain name: letters, digits, '.', '_' and '-', starting with a letter or digit, "
                "at most 100 characters (it names files and folders)")
    if kind == "literal_error":
        return f"valid values: {err.get('ctx', {}).get('expected', '')}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind == "value_error":  # a validator's own message: pydantic prefixes "Value error, "
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if kind == "finite_number":
        return "expected a finite number (not inf or nan)"
    if kind in bounds:
        (bound,) = err["ctx"].values()
        return f"must be {bounds[kind]} {bound}"
    return err["msg"][0].lower() + err["msg"][1:]


def _union_member(part: Any) -> bool:
    """pydantic names the union member it tried as a path element (``int``, ``float``, ``none``...)."""
    return isinstance(part, str) and (part in ("none", "int", "float", "bool", "str", "list", "tuple", "dict")
                                      or part.startswith(("function-", "list[", "tuple[", "dict[", "literal[")))


def format_errors(e: ValidationError, where: str, noun: str, model: type[BaseModel],
                  models: dict[tuple[str, ...], type[BaseModel]] | None = None, drop_prefix: tuple = ()) -> str:
    """One line per problem: unknown keys with the valid ones, bad values with what is expected.

    ``noun`` names the keys ("setting", "budget key", "key"); ``models`` maps a nested path (field names
    only) to its model, so an unknown nested key lists the keys valid at its own level; ``drop_prefix``
    is left off every path shown (a single-study sweep file is validated as study 0 of a sweep).
    """
    unknown: dict[tuple, list[str]] = {}
    bad: dict[tuple, tuple[Any, list[str]]] = {}
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if not _union_member(p))
        if drop_prefix and len(loc) > len(drop_prefix) and loc[:len(drop_prefix)] == drop_prefix:
            loc = loc[len(drop_prefix):]
        if err["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        value, reasons = bad.setdefault(loc, (err.get("input"), []))
        reason = _describe(err)
        if reason not in reasons:
            reasons.append(reason)
    lines = []
    for parent, keys in unknown.items():
        level = (models or {}).get(tuple(p for p in parent if isinstance(p, str)), model if not parent else None)
        valid = f"; valid: {', '.join(level.model_fields)}" if level is not None else ""
        close = {k: m[0] for k in sorted(keys)
                 if level is not None and (m := difflib.get_close_matches(k, list(level.model_fields), n=1))}
        hint = (f" (did you mean {next(iter(close.values()))!r}?)" if len(keys) == 1 and close else
                f" (did you mean {', '.join(f'{m!r} for {k!r}' for k, m in close.items())}?)" if close else "")
        prefix = ".".join(str(p) for p in parent)
        lines.append(f"unknown {noun}(s) {shown(sorted(keys))}{' under ' + prefix if prefix else ''}{hint}{valid}")
    for loc, (value, reasons) in bad.items():
        key = ".".join(str(p) for p in loc)
        lines.append(f"{noun} {key!r}={shown(value)}: {' or '.join(reasons)}")
    return f"{where}: " + ("\n  ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines))


def validate(model: type[M], raw: Any, where: str, noun: str = "setting") -> M:
    """``model`` built from ``raw`` (a mapping, or an instance already), or a ConfigError naming each problem."""
    if isinstance(raw, model):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {noun}s, got {shown(raw)}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, where, noun, model)) from None


def field_choices(model: type[BaseModel], name: str) -> list[Any]:
    """The values a Literal field allows (for messages and listings)."""
    return list(get_args(model.model_fields[name].annotation))

"""Errors the harness raises for bad input; the command line prints them without a traceback."""


class HarnessError(Exception):
    """A user-facing error: the message names what is wrong and what would be right."""


class ConfigError(HarnessError):
    """A sweep file, command-line setting or method setting is invalid."""


class DataError(HarnessError):
    """A dataset folder, list file, image or label is missing or invalid."""


class NonFiniteLossError(HarnessError):
    """Training met a NaN or infinite loss; the trial is recorded as failed."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at update {step}; the trial stops here "
                         "(lower the learning rate or check the data)")
        self.step = step
        self.value = value


class NotBuiltError(HarnessError):
    """A part of the harness that is named in the design but not built yet."""


def plural(kind: str) -> str:
    """``kind`` with its head noun in the plural: "rl benchmark" -> "rl benchmarks", "task of vtab1k" ->
    "tasks of vtab1k" (the noun before " of ", not the last word), "policy" -> "policies"."""
    head, sep, tail = kind.partition(" of ")
    stem, _, noun = head.rpartition(" ")
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        noun += "es"
    elif noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        noun = noun[:-1] + "ies"
    else:
        noun += "s"
    return f"{stem} {noun}".lstrip() + sep + tail


def choices_message(kind: str, value: object, valid: "list[str] | tuple[str, ...]") -> str:
    """Format 'unknown <kind> <value>; valid <kinds>: a, b, c' with a close-match hint; ``kind`` is the
    singular ("method", "task of vtab1k") and is put in the plural for the list (:func:`plural`)."""
    import difflib

    valid = list(valid)
    hint = difflib.get_close_matches(str(value), valid, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind} {value!r}{extra}; valid {plural(kind)}: {', '.join(valid)}"

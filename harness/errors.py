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


def choices_message(kind: str, value: object, valid: "list[str] | tuple[str, ...]") -> str:
    """Format 'unknown <kind> <value>; valid: a, b, c' with a close-match hint."""
    import difflib

    valid = list(valid)
    hint = difflib.get_close_matches(str(value), valid, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind} {value!r}{extra}; valid {kind}s: {', '.join(valid)}"

"""Progress for the long loops (dataset generation, pretraining, rollouts): a tqdm bar when stderr is a
terminal, plain lines otherwise, so logs (a file, a Ray worker's stream) stay readable: a line at most
every ``interval_s`` seconds, and a closing line only when the work took that long."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """Counts ``done`` of ``total`` units; use as a context manager, ``update(n)`` or ``update_to(n)``."""

    def __init__(self, total: int, desc: str, unit: str = "it", interval_s: float = 30.0,
                 stream: TextIO | None = None, bar: bool | None = None):
        self.total, self.desc, self.unit, self.interval_s = int(total), desc, unit, interval_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self.started = self._last = time.monotonic()
        use_bar = bar if bar is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` (a loss, ...) is shown beside the count."""
        self.update_to(self.done + n, **postfix)

    def update_to(self, done: int, **postfix: Any) -> None:
        """``done`` units done in all."""
        step, self.done = done - self.done, done
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.update(step)
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._line()

    def _line(self, final: bool = False) -> None:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.postfix.items())
        took = time.monotonic() - self.started
        print(f"[{self.desc}] {'done ' if final else ''}{self.done}/{self.total} {self.unit}{pct}{extra} "
              f"{took:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif time.monotonic() - self.started >= self.interval_s:
            self._line(final=True)


def progress(total: int, desc: str, unit: str = "it", interval_s: float = 30.0) -> Progress:
    """A :class:`Progress` on stderr: a bar on a terminal, plain periodic lines elsewhere."""
    return Progress(total, desc, unit, interval_s)


__all__ = ["Progress", "progress"]

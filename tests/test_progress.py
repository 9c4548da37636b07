"""Progress: a tqdm bar on a terminal, plain throttled lines in a log."""

from __future__ import annotations

import io

from harness.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_in_a_log_are_throttled_and_close_with_a_summary():
    log = io.StringIO()
    with Progress(100, "rl-pretrain", unit="update", interval_s=0.0, stream=log) as p:
        for i in range(1, 101):
            p.update_to(i, loss=1.0 / i)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[rl-pretrain] 1/100 update (1%) loss=1")
    assert lines[-1].startswith("[rl-pretrain] done 100/100 update (100%) loss=0.01")
    assert "\r" not in log.getvalue()  # no bar redraws in a log
    quiet = io.StringIO()
    with Progress(100, "rollout", interval_s=3600, stream=quiet) as p:
        p.update(100)
    assert quiet.getvalue() == ""  # short work leaves no line at all


def test_a_terminal_gets_a_tqdm_bar():
    tty = _Tty()
    with Progress(10, "rl-data", unit="task", stream=tty) as p:
        p.update(10)
    assert "rl-data" in tty.getvalue() and "/10 [" in tty.getvalue() and "\r" in tty.getvalue()

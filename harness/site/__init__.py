"""The static leaderboard site: ``index.html`` and a page per board in the leaderboard folder.

:func:`render` publishes boards (``python -m harness leaderboard`` and the end of every sweep): each
board's tables and plots (:func:`harness.leaderboard.write_tables_and_plots`), then the pages
(:func:`write_site`); :func:`harness.site.browser.screenshots` photographs a board and its Pareto plot in
headless Chromium (``python -m harness leaderboard --screenshots``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from harness import leaderboard
from harness.cache import write_if_changed
from harness.site.pages import Board, board_page, index_page


def load_boards(out_dir: Path) -> list[Board]:
    """Every board CSV in ``out_dir`` with its summary (recomputed, so it has the current columns)."""
    import pandas as pd

    boards = []
    for path in leaderboard.board_files(out_dir):
        meta = leaderboard.board_meta(path)
        table = leaderboard.with_efficiency(pd.read_csv(path), meta)
        summary = leaderboard.with_efficiency(
            leaderboard.summarise(table, meta.get("primary_metric", "score"), meta.get("groups", {}),
                                  meta.get("higher_is_better", True)), meta, summary=True)
        boards.append(Board(name=path.stem, table=table, summary=summary, meta=meta))
    return boards


def write_site(out_dir: Path, boards: "Iterable[str] | None" = None) -> list[Path]:
    """Write ``index.html`` and ``<board>.html`` for the boards named in ``boards`` (None: every board in
    ``out_dir``); the index lists every board. Returns the pages rendered; a page whose bytes would not
    change is left as it is (pages carry no time of writing, only the newest date of their rows)."""
    out_dir = Path(out_dir)
    every = load_boards(out_dir)
    if not every:
        return []
    wanted = None if boards is None else set(boards)
    written = []
    for board in every:
        if wanted is not None and board.name not in wanted:
            continue
        path = out_dir / board.page
        write_if_changed(path, board_page(board))
        written.append(path)
    index = out_dir / "index.html"
    write_if_changed(index, index_page(every))
    return [index, *written]


__all__ = ["Board", "load_boards", "write_site"]


def render(out_dir: Path, boards: "Iterable[str] | None" = None) -> list[Path]:
    """Markdown tables, plots and the static site (``index.html``, a page per board) for the boards named
    in ``boards`` (None: every board in ``out_dir``); the front page always lists every board. Returns the
    files rendered; a file whose bytes would not change is not rewritten, so a sweep leaves the files of
    boards it did not update, and an index whose content did not change, exactly as they were."""
    wanted = None if boards is None else set(boards)
    return leaderboard.write_tables_and_plots(out_dir, wanted) + write_site(out_dir, wanted)

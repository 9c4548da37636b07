"""The leaderboard site's pages: ``index.html`` and one page per board, built from the board CSVs.

Every page is one self-contained HTML file: the stylesheet and the script (``static/``) are inlined and
the Pareto plots are inline SVG, so the folder opens from disk with no server and no network. Tables are
rendered in full as HTML (every CSV row is there without the script); the script only sorts and filters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from harness import __version__, paper_refs
from harness.leaderboard import ENTRY_KEY, budget_label, entry_labels, keyed
from harness.site.pareto import Point, pareto_svg

# Filterable columns of the per-task table (those present in the board).
FILTERS = ("method", "task", "group", "backbone", "targets", "data_source")


@dataclass
class Board:
    """One leaderboard as the site shows it: its per-task rows, its summary and its metadata."""

    name: str
    table: pd.DataFrame
    summary: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return self.meta.get("primary_metric", "score")

    @property
    def higher_is_better(self) -> bool:
        return bool(self.meta.get("higher_is_better", True))

    @property
    def benchmark(self) -> str:
        return str(self.meta.get("benchmark") or (self.table["benchmark"].iloc[0] if "benchmark" in self.table
                                                 and len(self.table) else self.name))

    @property
    def synthetic(self) -> bool:
        return "synthetic" in set(self.table["data_source"].astype(str))

    @property
    def page(self) -> str:
        return f"{self.name}.html"


def _asset(name: str) -> str:
    return (resources.files("harness.site") / "static" / name).read_text()


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def _is_num(v: Any) -> bool:
    return math.isfinite(_num(v))


def fmt_number(v: Any, digits: int = 3) -> str:
    x = _num(v)
    if not math.isfinite(x):
        return ""
    if abs(x) >= 1000 or x == int(x):
        return f"{x:,.0f}" if abs(x - round(x)) < 1e-9 or abs(x) >= 1000 else f"{x:.{digits}g}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits + 1}g}"


def fmt_bytes(v: Any) -> str:
    x = _num(v)
    if not math.isfinite(x) or x <= 0:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return ""


def _data_badge(source: str) -> str:
    kind = "synthetic" if "synthetic" in source else "real"
    return f'<span class="badge {kind}">{escape(source)}</span>'


def _software_short(software: Any) -> str:
    try:
        versions = json.loads(software) if isinstance(software, str) and software.startswith("{") else {}
    except json.JSONDecodeError:
        versions = {}
    keep = [f"{k} {versions[k]}" for k in ("torch", "peft", "timm", "ray") if k in versions]
    return ", ".join(keep) or (str(software) if isinstance(software, str) else "")


@dataclass(frozen=True)
class Column:
    """One column of a table: its CSV key, its header, whether it is numeric, and how a row shows it."""

    key: str
    header: str
    numeric: bool = False
    show: Callable[[dict[str, Any]], str] | None = None
    value: Callable[[dict[str, Any]], Any] | None = None  # what sorting uses (default: the CSV value)
    wide: bool = False
    help: str = ""

    def cell(self, row: dict[str, Any]) -> str:
        raw = self.value(row) if self.value else row.get(self.key, "")
        text = self.show(row) if self.show else (fmt_number(raw) if self.numeric else escape(_text(raw)))
        sort_value = "" if raw is None or (isinstance(raw, float) and not math.isfinite(raw)) else str(raw)
        cls = " ".join(c for c in ("num" if self.numeric else "", "wide" if self.wide else "") if c)
        return (f'<td{f" class={chr(34)}{cls}{chr(34)}" if cls else ""} data-value="{escape(sort_value)}">'
                f"{text}</td>")


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


# A cell's text longer than COLLAPSE_OVER characters shows its first PREVIEW_CHARS or so and keeps the rest
# behind a disclosure: GLoRA's per-layer subnet runs to well over a thousand characters a row, and in a table
# as wide as the per-task one every row of a few hundred is five lines tall. The margin between the two keeps
# a disclosure from hiding a mere word or two.
COLLAPSE_OVER = 120
PREVIEW_CHARS = 80


def compact_text(text: str, limit: int = COLLAPSE_OVER, preview: int = PREVIEW_CHARS) -> str:
    """``text`` as escaped HTML for a table cell: as it is when at most ``limit`` characters, otherwise a
    ``<details>`` whose summary shows the first ``preview`` characters or so and whose body holds the whole
    text, so the row stays two lines tall and nothing is lost (the search box matches the hidden text too:
    it reads the rows' ``textContent``, and opens a cell whose hidden part holds the match)."""
    if len(text) <= limit:
        return escape(text)
    cut = text[:preview]
    # end the preview at a separator where one is near, not in the middle of a key or a number
    stop = max(cut.rfind(", "), cut.rfind("; "))
    if stop >= preview // 2:
        cut = cut[:stop + 1]
    return (f'<details class="long"><summary title="{len(text):,} characters: click for all of them">'
            f'<span class="preview">{escape(cut)} &hellip;</span></summary>'
            f'<div class="full">{escape(text)}</div></details>')


def _mean_se(row: dict[str, Any], mean_key: str, se_key: str) -> str:
    m, se = _num(row.get(mean_key)), _num(row.get(se_key))
    if not math.isfinite(m):
        return ""
    return fmt_number(m) + (f' <span class="se">&plusmn; {fmt_number(se, 2)}</span>' if math.isfinite(se) else "")


def _reference(board: Board, row: dict[str, Any], task: str | None = None,
               rows: list[dict[str, Any]] | None = None) -> paper_refs.Reference | None:
    """The paper's number for this row when the protocol matches (for a summary entry: every task row
    of the entry must match)."""
    task = task or str(row.get("task", ""))
    found = paper_refs.match(board.benchmark, str(row.get("method")), task, board.primary, row)
    if found and rows:
        found = [r for r in found if all(not paper_refs.protocol_mismatch(r, x) for x in rows)]
    return found[0] if found else None


def _ref_cells(ref: paper_refs.Reference | None, ours: float) -> tuple[str, str]:
    if ref is None:
        return '<td class="num" data-value=""></td>', '<td class="num" data-value=""></td>'
    se = f' <span class="se">&plusmn; {fmt_number(ref.se, 2)}</span>' if ref.se is not None else ""
    title = escape(ref.source + (f"; {ref.note}" if ref.note else ""))
    paper = f'<td class="num" data-value="{ref.value}" title="{title}">{fmt_number(ref.value)}{se}</td>'
    if not math.isfinite(ours):
        return paper, '<td class="num" data-value=""></td>'
    d = ours - ref.value
    cls = "pos" if d > 0 else "neg" if d < 0 else ""
    return paper, f'<td class="num delta {cls}" data-value="{d}">{d:+.3g}</td>'


# A row shows its label (the method, with its targets or selection where the method has rows on the board
# that differ in them, so no two rows read alike); filters and sorting keep the bare method name.
_METHOD = Column("method", "method", show=lambda r: escape(_text(r.get("label", r.get("method")))))


def _selection_text(row: dict[str, Any]) -> str:
    """How the row's settings were chosen, and among how many grid points where there was a choice."""
    points = _num(row.get("grid_size"))
    return _text(row.get("selection")) + (f" of {int(points)}" if math.isfinite(points) and points > 1 else "")


# How every row was made, beside what it scored: a 3K-update row never reads as the paper's 100K.
_SELECTION = Column("selection", "selection", show=lambda r: escape(_selection_text(r)),
                    help="how the settings were chosen (held-out: on episodes or images apart from the reported "
                         "ones; a scheduler's name where it stopped selection trials early), and among how many "
                         "grid points")
_BUDGET = Column("budget", "budget", show=lambda r: escape(budget_label(r.get("budget"))),
                 help="each trial's training budget")


def task_columns(board: Board) -> list[Column]:
    """The per-task table's columns, those the board has."""
    t, p = board.table, board.primary
    cols = [_METHOD, Column("task", "task"), Column("group", "group"),
            Column("backbone", "backbone")]
    if "targets" in t:
        cols.append(Column("targets", "targets", help="the modules the method adapted"))
    cols += [c for c in (_SELECTION, _BUDGET) if c.key in t]
    cols += [
        Column("data_source", "data", show=lambda r: _data_badge(_text(r.get("data_source")))),
        Column(f"{p}_mean", f"{p} (mean &plusmn; s.e.)", True, show=lambda r: _mean_se(r, f"{p}_mean", f"{p}_se")),
        Column("expert_success_mean", "expert ceiling", True,
               help="the data's noise-free expert on the same episodes: a score near it is capped by the data"),
        Column("n_seeds", "seeds", True),
        Column("trainable_params", "trainable params", True, help="the method's own, head apart"),
        Column("head_params", "head params", True),
    ]
    if "ppt" in t:
        cols.append(Column("ppt", "PPT", True, help="V-PETL Bench's parameter-efficiency score"))
    cols += [Column("train_peak_memory_mb", "train peak MiB", True),
             Column("train_reserved_memory_mb", "train reserved MiB", True),
             Column("train_mean_reserved_mb", "mean reserved MiB", True),
             Column("ms_per_update", "ms / update", True),
             Column("adapter_bytes", "checkpoint", True, show=lambda r: fmt_bytes(r.get("adapter_bytes"))),
             Column("wall_time_s", "trial wall s", True),
             Column("settings", "settings", show=lambda r: compact_text(_text(r.get("settings"))), wide=True),
             Column("device_name", "ran on",
                    show=lambda r: compact_text(f"{_text(r.get('device_name'))}; {_software_short(r.get('software'))}; "
                                                f"commit {_text(r.get('git_commit'))[:10]}"), wide=True)]
    return [c for c in cols if c.key in t or c.key in ("data_source",)]


def _options(values: list[str]) -> str:
    return "".join(f'<option value="{escape(v)}">{escape(v)}</option>' for v in values)


def _filters(board: Board, table_id: str) -> str:
    parts = [f'<div class="filters" data-for="{table_id}">']
    for key in FILTERS:
        if key in board.table:
            values = sorted({_text(v) for v in board.table[key]})
            parts.append(f'<label>{escape(key.replace("_", " "))} <select data-col="{key}">'
                         f'<option value="">all</option>{_options(values)}</select></label>')
    parts.append('<label>search <input type="search" placeholder="any text"></label>'
                 '<span class="count"></span></div>')
    return "".join(parts)


def task_table(board: Board) -> str:
    """The per-task rows: sortable, filterable, the paper's number and the difference where it matches."""
    cols = task_columns(board)
    p = board.primary
    split = next(i for i, c in enumerate(cols) if c.key == f"{p}_mean") + 1  # the paper's cells follow the score
    head = "".join(f'<th{" class=num" if c.numeric else ""}{f" title={chr(34)}{escape(c.help)}{chr(34)}" if c.help else ""}>'
                   f"{c.header}</th>" for c in cols[:split])
    head += '<th class="num" title="the paper\'s published number, where its protocol matches this row">paper</th>' \
            '<th class="num" title="ours minus the paper\'s">&Delta; vs paper</th>'
    head += "".join(f'<th{" class=num" if c.numeric else ""}{f" title={chr(34)}{escape(c.help)}{chr(34)}" if c.help else ""}>'
                    f"{c.header}</th>" for c in cols[split:])
    body = []
    for row, label in zip(board.table.to_dict("records"), entry_labels(board.table)):
        row["label"] = label
        synthetic = "synthetic" in _text(row.get("data_source"))
        attrs = "".join(f' data-{k}="{escape(_text(row.get(k)))}"' for k in FILTERS if k in board.table)
        cells = [c.cell(row) for c in cols]
        paper, delta = _ref_cells(_reference(board, row), _num(row.get(f"{p}_mean")))
        body.append(f'<tr class="{"synthetic" if synthetic else "real"}"{attrs}>'
                    + "".join(cells[:split]) + paper + delta + "".join(cells[split:]) + "</tr>")
    return (_filters(board, "rows") + '<div class="table-wrap"><table id="rows" class="sortable">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def entry_costs(board: Board) -> pd.DataFrame:
    """Per summary entry (method, backbone, targets, selection): the summary's score and parameters beside
    the mean memory and time per update over its tasks (what the Pareto plots put on their axes), and the
    entry's ``label`` (:func:`harness.leaderboard.entry_labels`)."""
    t = keyed(board.table, ENTRY_KEY)
    cost_cols = [c for c in ("train_peak_memory_mb", "train_reserved_memory_mb", "ms_per_update", "adapter_bytes")
                 if c in t]
    costs = t.groupby(ENTRY_KEY, sort=False)[cost_cols].mean().reset_index() if cost_cols else \
        t[ENTRY_KEY].drop_duplicates()
    s = keyed(board.summary, ENTRY_KEY).merge(costs, on=ENTRY_KEY, how="left")
    s["label"] = entry_labels(s)
    return s


def summary_table(board: Board) -> str:
    """Per (method, backbone): group means, their average with the paper's average beside it, costs."""
    s = entry_costs(board)
    p = board.primary
    groups = [g for g in board.meta.get("groups", {}) if f"{g}_{p}" in s]
    cols = [_METHOD, Column("backbone", "backbone"), *[c for c in (_SELECTION, _BUDGET) if c.key in s],
            Column("data_source", "data", show=lambda r: _data_badge(_text(r.get("data_source")))),
            Column("n_tasks", "tasks", True)]
    cols += [Column(f"{g}_{p}", f"{g}", True) for g in groups]
    cols.append(Column(f"average_{p}", f"average {p} (&plusmn; s.e.)", True,
                       show=lambda r: _mean_se(r, f"average_{p}", f"average_{p}_se")))
    tail = [Column("trainable_params", "trainable params", True)]
    if "ppt" in s:
        tail.append(Column("ppt", "PPT", True))
    tail += [Column(k, h, True) for k, h in (("train_peak_memory_mb", "train peak MiB"),
                                              ("ms_per_update", "ms / update")) if k in s]
    if "adapter_bytes" in s:
        tail.append(Column("adapter_bytes", "checkpoint", True, show=lambda r: fmt_bytes(r.get("adapter_bytes"))))
    head = "".join(f'<th{" class=num" if c.numeric else ""}>{c.header}</th>' for c in cols)
    head += '<th class="num">paper average</th><th class="num">&Delta; vs paper</th>'
    head += "".join(f'<th{" class=num" if c.numeric else ""}>{c.header}</th>' for c in tail)
    body = []
    t = keyed(board.table, ENTRY_KEY)
    for row in s.to_dict("records"):
        mine = (t[ENTRY_KEY] == pd.Series({k: row[k] for k in ENTRY_KEY})).all(axis=1)
        rows = board.table[mine].to_dict("records")
        ref = _reference(board, {**rows[0], **row}, task="average", rows=rows) if rows else None
        paper, delta = _ref_cells(ref, _num(row.get(f"average_{p}")))
        synthetic = "synthetic" in _text(row.get("data_source"))
        body.append(f'<tr class="{"synthetic" if synthetic else "real"}">' + "".join(c.cell(row) for c in cols)
                    + paper + delta + "".join(c.cell(row) for c in tail) + "</tr>")
    return ('<div class="table-wrap"><table id="summary" class="sortable">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


PARETO_AXES = (
    ("trainable_params", "trainable parameters (method's own, head apart)", True),
    ("train_peak_memory_mb", "training peak GPU memory (MiB)", False),
    ("ms_per_update", "time per update (ms)", False),
)


def pareto_plots(board: Board) -> str:
    """One Pareto plot per cost: the average score against parameters, peak memory and time per update."""
    s = entry_costs(board)
    p = board.primary
    multi = s.groupby("method")["backbone"].transform("nunique") > 1  # the method ran on several backbones
    figures = []
    for key, label, log_x in PARETO_AXES:
        if key not in s:
            continue
        points = [Point(label=r["label"] + (f" [{str(r['backbone']).partition('[')[2].rstrip(']')}]" if dup else ""),
                        cost=_num(r[key]), score=_num(r[f"average_{p}"]),
                        synthetic="synthetic" in _text(r.get("data_source")))
                  for r, dup in zip(s.to_dict("records"), multi)]
        if not any(pt.cost > 0 for pt in points):
            figures.append(f'<figure><figcaption>{escape(label)}: not recorded (the runs were on a CPU, or '
                           "older than this column).</figcaption></figure>")
            continue
        svg = pareto_svg(points, label, f"average {p}", board.higher_is_better, log_x=log_x,
                         title=f"{board.name}: average {p} against {label}")
        figures.append(f'<figure class="pareto-figure" id="pareto-{key}">{svg}<figcaption>Average {escape(p)} '
                       f"against {escape(label)}; filled points are on the Pareto frontier (nothing else is "
                       f"cheaper and better).{' Synthetic data: not comparable with real benchmarks.' if board.synthetic else ''}"
                       "</figcaption></figure>")
    return f'<div class="plots">{"".join(figures)}</div>'


def references_note(board: Board) -> str:
    """Which papers published numbers for this benchmark, and whether their protocol matches ours."""
    refs = paper_refs.for_benchmark(board.benchmark)
    if not refs:
        return '<p class="note">No paper in the package publishes numbers for this benchmark.</p>'
    rows = board.table.to_dict("records")
    items = []
    for source in sorted({r.source for r in refs}):
        mine = [r for r in refs if r.source == source]
        matched = sum(1 for r in mine for row in rows
                      if (row.get("method"), row.get("task")) == (r.method, r.task) and r.metric == board.primary
                      and not paper_refs.protocol_mismatch(r, row))
        why = ""
        if not matched and rows:
            reasons = {paper_refs.protocol_mismatch(r, row) for r in mine for row in rows
                       if row.get("method") == r.method}
            reasons.discard("")
            why = f" Not shown: {escape(sorted(reasons)[0])}." if reasons else " Not shown: no method in common."
        items.append(f"<li>{escape(source)}: {len(mine)} numbers; {matched} shown beside our rows.{why}</li>")
    return ('<p class="note">Papers\' own numbers appear in the <em>paper</em> column only where the protocol '
            "matches (real data, the same pretrained backbone, and the targets and budget where the paper states "
            "them); they are never part of our means.</p><ul>" + "".join(items) + "</ul>")


def provenance_list(board: Board) -> str:
    """The software and hardware the rows ran on, each combination with its row count."""
    t = board.table
    keys = [k for k in ("device_name", "software", "git_commit", "harness_version") if k in t]
    if not keys:
        return '<p class="empty">No provenance recorded.</p>'
    combos = t.groupby(keys, dropna=False).size().reset_index(name="rows")
    items = []
    for r in combos.to_dict("records"):
        items.append(f"<li><strong>{escape(_text(r.get('device_name')))}</strong>; "
                     f"{escape(_software_short(r.get('software')) or '')}; harness {escape(_text(r.get('harness_version')))} "
                     f"at commit <code>{escape(_text(r.get('git_commit')))}</code>: {r['rows']} rows"
                     f"<br><small>{escape(_text(r.get('software')))}</small></li>")
    return "<ul>" + "".join(items) + "</ul>"


COLUMN_NOTES = """<dl class="note">
<dt>mean &plusmn; s.e.</dt><dd>over seeds, for the settings with the best mean score (per task).</dd>
<dt>trainable params</dt><dd>the method's own, counted as its paper does; the task head apart (head params).</dd>
<dt>PPT</dt><dd>V-PETL Bench's parameter-efficiency score, vision boards only: accuracy &times;
exp(&minus;log10(P / 10<sup>7</sup> + 1)), with accuracy in percent and P the method's own trainable parameters
(head apart, as V-PETL Bench's parameter counts).</dd>
<dt>train peak / reserved / mean reserved MiB</dt><dd>GPU memory while training only: the allocated peak, the
caching allocator's reserved peak, and reserved memory averaged over updates (0 on a CPU).</dd>
<dt>ms / update</dt><dd>training time per optimiser update after the first updates (compilation, warm-up).</dd>
<dt>checkpoint</dt><dd>the saved adapter's tensors on disk (the head included when it is trained).</dd>
<dt>trial wall s</dt><dd>the whole trial: data, training, evaluation, search, saving.</dd>
</dl>"""


def rows_dated(tables: list[pd.DataFrame]) -> str:
    """The newest ``date`` of the rows in ``tables`` ("" when none records one): what a page's footer says
    instead of the time of writing, so a page regenerated from unchanged rows is byte-identical."""
    dates = [str(d) for t in tables if "date" in t for d in t["date"].dropna()]
    return max(dates, default="")


def _page(title: str, body: str, dated: str = "") -> str:
    stamp = f" from rows dated up to {escape(dated)}" if dated else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{_asset('site.css')}</style><script>{_asset('site.js')}</script></head><body>{body}"
            f"<footer>Written by the harness {escape(__version__)}{stamp}. Every file this page needs is in it: "
            "it opens from disk with no server and no network.</footer></body></html>\n")


def board_page(board: Board) -> str:
    """One board's page: summary, per-task table, Pareto plots, references and provenance."""
    synthetic = (f'<p class="banner synthetic"><span class="badge synthetic">synthetic</span> The rows marked synthetic '
                 "ran on the harness's built-in generated data: they show the pipeline works, and are never to be "
                 "compared with real benchmarks or the papers.</p>" if board.synthetic else "")
    order = "higher is better" if board.higher_is_better else "lower is better"
    body = (f'<p><a href="index.html">&larr; all boards</a></p><h1>{escape(board.name)}</h1>'
            f'<p class="note">Benchmark <strong>{escape(board.benchmark)}</strong> '
            f'({escape(str(board.meta.get("track", "")))} track), ranked by <code>{escape(board.primary)}</code> '
            f"({order}). {len(board.table)} rows (method &times; task).</p>{synthetic}"
            f"<h2>Summary</h2>{summary_table(board)}"
            f"<h2>Pareto plots</h2>{pareto_plots(board)}"
            f"<h2>Per task</h2>{task_table(board)}"
            f"<h2>Papers' numbers</h2>{references_note(board)}"
            f"<h2>Software and hardware</h2>{provenance_list(board)}"
            f"<h2>Columns</h2>{COLUMN_NOTES}")
    return _page(f"{board.name}: leaderboard", body, rows_dated([board.table]))


def index_page(boards: list[Board]) -> str:
    """The front page: every board with its benchmark, data source, size and leader."""
    rows = []
    for b in boards:
        col = f"average_{b.primary}"
        leader = ""
        if len(b.summary) and col in b.summary:
            labelled = b.summary.assign(label=entry_labels(b.summary))
            best = labelled.sort_values(col, ascending=not b.higher_is_better).iloc[0]
            leader = f"{best['label']} ({fmt_number(best[col])})"
        sources = sorted({_text(v) for v in b.table["data_source"]})
        rows.append(f'<tr class="{"synthetic" if b.synthetic else "real"}">'
                    f'<td data-value="{escape(b.name)}"><a href="{escape(b.page)}">{escape(b.name)}</a></td>'
                    f'<td>{escape(str(b.meta.get("track", "")))}</td><td>{escape(b.benchmark)}</td>'
                    f'<td data-value="{escape(",".join(sources))}">{" ".join(_data_badge(s) for s in sources)}</td>'
                    f'<td>{escape(b.primary)}</td><td class="num" data-value="{len(b.table)}">{len(b.table)}</td>'
                    f'<td class="num" data-value="{b.table["method"].nunique()}">{b.table["method"].nunique()}</td>'
                    f"<td>{escape(leader)}</td></tr>")
    body = ("<h1>Leaderboard</h1><p class=\"note\">Adapter (PEFT) methods benchmarked by the harness. Each board "
            "has its summary, Pareto plots of score against parameters, memory and time per update, the per-task "
            "rows with the papers' numbers where the protocol matches, and what each row ran on. Boards on "
            "<span class=\"badge synthetic\">synthetic</span> data ran on the built-in generated suite.</p>"
            '<div class="table-wrap"><table id="boards" class="sortable"><thead><tr><th>board</th><th>track</th>'
            '<th>benchmark</th><th>data</th><th>ranked by</th><th class="num">rows</th><th class="num">methods</th>'
            f"<th>leader (average)</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            f"<h2>Columns</h2>{COLUMN_NOTES}")
    return _page("Leaderboard", body, rows_dated([b.table for b in boards]))

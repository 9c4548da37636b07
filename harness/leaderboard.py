"""Leaderboard CSVs: one row per (method, task, backbone, targets, selection, budget) with mean and
standard error over seeds, plus a summary.

Files in the leaderboard folder, per board (the benchmark, or the study's ``leaderboard`` name):
``<board>.csv`` (per task), ``<board>-summary.csv`` (per method, backbone, targets, selection and budget:
group means, their average, parameters), and, from ``python -m harness leaderboard``, ``<board>.md`` and
two plots. Writes are atomic; a rerun replaces the rows of the (method, task, backbone, targets,
selection, budget) it reran and keeps the rest, so rows never duplicate, and two studies that differ only
in the adapted layers, in how settings were chosen or in their training budget keep a row each. A record
or CSV without ``targets``, ``selection`` or ``budget`` keys as "" there.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from harness import __version__
from harness.cache import TEMP_MARK, is_harness_temporary, write_if_changed
from harness.tracks import get_track
from harness.trial import TrialRecord

# What makes a row: two studies that differ in any of these (LoRA on q,v against LoRA on every Linear; EVA's
# on-reported convention against held-out selection; 3K updates against the paper's 100K) are two results,
# and neither may replace the other.
ROW_KEY = ["method", "task", "backbone", "targets", "selection", "budget"]
# What makes a summary entry: a row's identity over its tasks.
ENTRY_KEY = [k for k in ROW_KEY if k != "task"]
_PROVENANCE = ("git_commit", "device_name", "software")
_BOOKKEEPING = {f.name for f in fields(TrialRecord)} | {"extra"}


# What may tell two entries of one method apart, in the order their labels show it.
_ENTRY_PARTS = ("backbone", "targets", "selection", "budget")
# Budget keys that do not change what a row's number measures: how often progress is logged, and the
# stage, which is "final" for every row on a board.
_BUDGET_BOOKKEEPING = ("report_every", "stage")


def _budget(budget: Any) -> dict[str, Any] | str:
    """A row's or record's budget as a mapping (from a JSON object or a mapping); anything else as its text
    ("" for none)."""
    if isinstance(budget, str):
        try:
            budget = json.loads(budget) if budget.strip() else ""
        except json.JSONDecodeError:
            return budget
    if isinstance(budget, dict):
        return budget
    return "" if budget in (None, "") else str(budget)


def budget_key(budget: Any) -> str:
    """A budget as a row key: its JSON with sorted keys, bookkeeping keys left out; text that is not a JSON
    object is kept as it is."""
    b = _budget(budget)
    if isinstance(b, str):
        return b
    return json.dumps({k: v for k, v in b.items() if k not in _BUDGET_BOOKKEEPING}, sort_keys=True)


def keyed(df: pd.DataFrame, key: list[str] = ROW_KEY) -> pd.DataFrame:
    """``df`` with every column of ``key`` as text, a missing column or a missing value as "": records and
    boards older than ``targets``, ``selection`` or ``budget`` key like rows that recorded them empty. A
    budget keys by :func:`budget_key`."""
    df = df.copy()
    for k in key:
        df[k] = df[k].astype(object).fillna("").astype(str) if k in df else ""
    if "budget" in key:
        df["budget"] = df["budget"].map(budget_key)
    return df


def budget_label(budget: Any) -> str:
    """A row's training budget in words (``3,000 updates, batch 128, 10 eval episodes``; vision: ``100
    epochs``), from the budget its records carry (a JSON object or a mapping); "" when none was recorded."""
    b = _budget(budget)
    if isinstance(b, str) or not b:
        return b or ""
    parts = []
    if b.get("epochs"):
        capped = f" (at most {int(b['steps']):,} updates)" if b.get("steps") else ""
        parts.append(f"{int(b['epochs']):,} epochs{capped}")
    elif b.get("steps") is not None:
        parts.append(f"{int(b['steps']):,} updates")
    if b.get("batch_size"):
        parts.append(f"batch {int(b['batch_size'])}")
    if b.get("eval_episodes"):
        parts.append(f"{int(b['eval_episodes'])} eval episodes")
    return ", ".join(parts) or json.dumps(b, sort_keys=True)


def entry_labels(table: pd.DataFrame, parts: tuple[str, ...] = ("targets", "selection", "budget")) -> list[str]:
    """Each row's method name, followed in brackets by its values of those ``parts`` in which the method's
    rows on the board differ (``lora [attn.qkv.q,attn.qkv.v]`` beside ``lora [attn.qkv,mlp.fc1]``; a budget
    in words), so two entries of one method never show under one name; a method with one entry keeps its
    bare name."""
    t = keyed(table, ["method", *parts]).reset_index(drop=True)
    varies = {p: t.groupby("method")[p].transform("nunique") > 1 for p in parts}
    labels = []
    for i, row in t.iterrows():
        shown = [(budget_label(row[p]) if p == "budget" else row[p]) or "unrecorded" for p in parts if varies[p][i]]
        labels.append(row["method"] + (f" [{'; '.join(shown)}]" if shown else ""))
    return labels


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns of a records frame: the numeric ones that are not bookkeeping."""
    return [c for c in df.columns if c not in _BOOKKEEPING and pd.api.types.is_numeric_dtype(df[c])]


def _se(x: pd.Series) -> float:
    x = x.dropna()
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def aggregate(records: list[dict[str, Any]], primary: str, groups: dict[str, Any],
              higher_is_better: bool = True) -> pd.DataFrame:
    """Per row (``ROW_KEY``): the best settings by mean ``primary`` over seeds, with mean and SE of each metric."""
    ok = pd.DataFrame([r for r in records if r.get("status") == "ok"])
    if ok.empty:
        return pd.DataFrame()
    metrics = metric_columns(ok)
    rows = []
    for (method, task, backbone, targets, selection, budget), part in keyed(ok).groupby(ROW_KEY, sort=False):
        by_settings = part.groupby("settings")
        if primary in part:
            means = by_settings[primary].mean()
            best = means.idxmax() if higher_is_better else means.idxmin()
        else:
            best = next(iter(by_settings.groups))
        chosen = by_settings.get_group(best)
        row: dict[str, Any] = {"method": method, "task": task,
                               "group": next((g for g, ts in groups.items() if task in ts), ""),
                               "benchmark": chosen["benchmark"].iloc[0]}
        for m in metrics:
            row[f"{m}_mean"] = float(chosen[m].mean())
            row[f"{m}_se"] = _se(chosen[m])
        row.update(
            n_seeds=int(chosen["seed"].nunique()), trainable_params=int(chosen["trainable_params"].max()),
            head_params=int(chosen["head_params"].max()), peak_memory_mb=float(chosen["peak_memory_mb"].max()),
            wall_time_s=float(chosen["wall_time_s"].mean()),
            # the costs of the method itself: training alone (missing in records older than these columns)
            train_peak_memory_mb=float(chosen["train_peak_memory_mb"].max()) if "train_peak_memory_mb" in chosen else 0.0,
            ms_per_update=float(chosen["ms_per_update"].mean()) if "ms_per_update" in chosen else 0.0,
            **_efficiency(chosen),
            settings=best, backbone=backbone,
            # how the settings were chosen (held-out / on-reported / single-point) and from how many grid points
            selection=selection,
            grid_size=int(chosen["grid_size"].fillna(0).max()) if "grid_size" in chosen else 0,
            data_source=str(chosen["data_source"].iloc[0]), harness_version=__version__,
            date=str(chosen["date"].max()),
            # the LoRA family's scale (harness/scaling.py), as its records say
            **({"alpha_rule": ";".join(sorted(set(chosen["alpha_rule"].fillna("").astype(str))))}
               if "alpha_rule" in chosen else {}),
            budget=budget,
            **({"targets": targets} if "targets" in ok else {}),
            # what made the row: one value when every seed ran on the same software and hardware
            **{k: ";".join(sorted(set(chosen[k].fillna("").astype(str)))) for k in _PROVENANCE if k in chosen},
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _efficiency(chosen: pd.DataFrame) -> dict[str, float]:
    """The method's other costs, where the records carry them (older records do not)."""
    out: dict[str, float] = {}
    for col, how in (("train_reserved_memory_mb", "max"), ("train_mean_reserved_mb", "mean"),
                     ("adapter_bytes", "max")):
        if col in chosen:
            out[col] = float(getattr(chosen[col], how)())
    return out


def ppt_score(accuracy: float | pd.Series, params: float | pd.Series):
    """V-PETL Bench's parameter-efficiency score: accuracy x exp(-log10(P / 1e7 + 1)), accuracy in percent
    and P the method's own trainable parameters (head apart, as V-PETL Bench counts them): 1e7 parameters
    cost a factor e^-log10(2), about 0.74."""
    import numpy as np

    return accuracy * np.exp(-np.log10(params / 1e7 + 1))


def with_efficiency(table: pd.DataFrame, meta: dict[str, Any], summary: bool = False) -> pd.DataFrame:
    """``table`` with the derived efficiency columns: ``ppt`` on vision boards (from the row's mean score,
    or the summary's average, and its trainable parameters)."""
    if meta.get("track") != "vision" or table.empty:
        return table
    primary = meta.get("primary_metric", "top1")
    score = f"average_{primary}" if summary else f"{primary}_mean"
    if score in table and "trainable_params" in table:
        table = table.copy()
        table["ppt"] = ppt_score(table[score], table["trainable_params"].astype(float))
    return table


def summarise(table: pd.DataFrame, primary: str, groups: dict[str, Any], higher_is_better: bool = True
              ) -> pd.DataFrame:
    """Per entry (``ENTRY_KEY``: method, backbone, targets, selection, budget): group means, the average (of group
    means when there are groups), mean parameters."""
    col = f"{primary}_mean"
    rows = []
    # A probe on a random init is not the same entry as on a pretrained one, nor LoRA on q,v as on every
    # Linear, nor settings chosen on the reported metric as on held-out data.
    for entry, part in keyed(table).groupby(ENTRY_KEY, sort=False):
        row: dict[str, Any] = {**dict(zip(ENTRY_KEY, entry)), "n_tasks": int(part["task"].nunique())}
        group_means = []
        for g in groups:
            sub = part[part["group"] == g]
            if len(sub):
                row[f"{g}_{primary}"] = float(sub[col].mean())
                group_means.append(row[f"{g}_{primary}"])
        row[f"average_{primary}"] = float(sum(group_means) / len(group_means)) if group_means else float(part[col].mean())
        ses = part[f"{primary}_se"].dropna()
        row[f"average_{primary}_se"] = float(math.sqrt((ses ** 2).sum()) / len(part)) if len(ses) == len(part) else float("nan")
        # Averaged like the scores (GLoRA Table 1: "# params ... averaged over group-wise mean values"), so a
        # method whose count differs by task is not weighted towards the largest group.
        group_params = [float(part[part["group"] == g]["trainable_params"].mean()) for g in groups
                        if (part["group"] == g).any()]
        row["trainable_params"] = (float(sum(group_params) / len(group_params)) if group_params
                                   else float(part["trainable_params"].mean()))
        row["data_source"] = ",".join(sorted(set(part["data_source"])))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(f"average_{primary}", ascending=not higher_is_better)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_if_changed(path, buf.getvalue())


# The names the leaderboard folder gives its own files, which no board may take: ``index`` (the site's front
# page, index.html) and any name ending in ``-summary`` (``<board>-summary.csv`` is a board's summary, and
# CSVs so named are read as summaries, never as boards). Compared without case: on macOS's and Windows'
# filesystems Index.html is index.html. Every other file of a board is named ``<board>.<ext>`` or
# ``<board>-<plot>.png``, which no other board's name can produce. Sweep files are checked against this
# (harness/sweep_file.py) and ``python -m harness leaderboard`` skips CSVs so named.
RESERVED_BOARD_NAMES = ("index",)
RESERVED_BOARD_SUFFIXES = ("-summary",)


def board_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a board (it would overwrite or be read as a file the site writes), or None."""
    low = name.lower()
    if low in RESERVED_BOARD_NAMES:
        return f"{name!r} is the site's front page ({low}.html); choose another board name"
    for suffix in RESERVED_BOARD_SUFFIXES:
        if low.endswith(suffix):
            return (f"names ending in {suffix!r} are the boards' summaries ({name}.csv would be read as the summary "
                    f"of board {name[:-len(suffix)]!r}, never as a board); choose another board name")
    return None


def board_meta(path: Path) -> dict[str, Any]:
    """The board's metadata (track, benchmark, primary metric, groups) kept beside its CSV."""
    meta = path.with_suffix(".json")
    return json.loads(meta.read_text()) if meta.exists() else {}


LOCK_FILE = ".leaderboard.lock"
STALE_TMP_S = 600  # a temporary file this old was left by a writer that died mid-write


def board_lock(out_dir: Path):
    """The lock every read-merge-write of a leaderboard folder holds: two sweeps updating one board at
    once would otherwise each merge into what the other had not yet written, and rows would be lost.
    A file lock (``filelock``: fcntl/flock), so it holds across processes and on storage that honours
    POSIX locks; it is released when its holder dies."""
    from filelock import FileLock

    out_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out_dir / LOCK_FILE), timeout=600)


def _clean_stale_temporaries(out_dir: Path) -> None:
    """Remove temporary files that a killed writer left behind: only files named as the harness's atomic
    writes name their temporaries (:func:`harness.cache.is_harness_temporary`), never anything else in the
    folder (a user's dotfiles), and only once they are older than any write takes."""
    import time

    for tmp in out_dir.glob(f".*.{TEMP_MARK}.*"):
        if is_harness_temporary(tmp) and tmp.is_file() and time.time() - tmp.stat().st_mtime > STALE_TMP_S:
            tmp.unlink(missing_ok=True)


def update(records: list[dict[str, Any]], study, out_dir: Path) -> list[Path]:
    """Merge a study's records into its board's CSVs, under the folder's lock; return the files written."""
    bench = get_track(study.track).benchmark(study.benchmark)
    groups = {g: list(ts) for g, ts in bench.groups.items()}
    table = aggregate(records, bench.primary_metric, groups, bench.higher_is_better)
    if table.empty:
        return []
    with board_lock(out_dir):
        _clean_stale_temporaries(out_dir)
        return _merge_write(table, study, bench, groups, out_dir)


def _merge_write(table: pd.DataFrame, study, bench, groups: dict[str, Any], out_dir: Path) -> list[Path]:
    path = out_dir / f"{study.board_name}.csv"
    if path.exists():
        old = pd.read_csv(path, keep_default_na=True)
        keys = set(map(tuple, keyed(table)[ROW_KEY].values))
        keep = old[[tuple(k) not in keys for k in keyed(old)[ROW_KEY].values]]
        table = pd.concat([keep, table], ignore_index=True)
    table = table.loc[keyed(table).sort_values(ROW_KEY, kind="stable").index].reset_index(drop=True)
    meta = {"track": study.track, "benchmark": study.benchmark, "primary_metric": bench.primary_metric,
            "higher_is_better": bench.higher_is_better, "groups": groups}
    table = with_efficiency(table, meta)
    _write_csv(table, path)
    write_if_changed(path.with_suffix(".json"), json.dumps(meta, indent=1))
    summary_path = out_dir / f"{study.board_name}-summary.csv"
    _write_csv(with_efficiency(summarise(table, bench.primary_metric, groups, bench.higher_is_better), meta,
                               summary=True), summary_path)
    return [path, summary_path]


def board_files(out_dir: Path) -> list[Path]:
    """The leaderboard CSVs in ``out_dir``: those with a board's columns. Other CSVs (an empty file, a table
    of something else) are skipped with a warning instead of failing the whole render."""
    import warnings

    boards = []
    for path in sorted(out_dir.glob("*.csv")):
        if path.stem.lower().endswith(RESERVED_BOARD_SUFFIXES):
            continue
        if board_name_problem(path.stem):
            warnings.warn(f"{path}: not rendered as a board: {board_name_problem(path.stem)}", stacklevel=2)
            continue
        try:
            columns = set(pd.read_csv(path, nrows=0).columns)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            warnings.warn(f"{path}: not a leaderboard CSV ({type(e).__name__}); skipped", stacklevel=2)
            continue
        missing = {"method", "task", "backbone", "data_source", "trainable_params"} - columns
        if missing:
            warnings.warn(f"{path}: not a leaderboard CSV (no column {sorted(missing)[0]!r}); skipped", stacklevel=2)
            continue
        boards.append(path)
    return boards


def write_tables_and_plots(out_dir: Path, boards: "Iterable[str] | None" = None) -> list[Path]:
    """Each board's summary CSV, markdown tables and plots, for the boards named in ``boards`` (None: every
    board in ``out_dir``); returns the files written. A file whose bytes would not change is not rewritten.
    The site's pages come on top of these in :func:`harness.site.render`, which publishes a board."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = None if boards is None else set(boards)
    written = []
    for path in board_files(out_dir):
        if wanted is not None and path.stem not in wanted:
            continue
        meta = board_meta(path)
        primary = meta.get("primary_metric", "score")
        with board_lock(out_dir):  # a sweep may be merging into this board right now
            table = pd.read_csv(path)
            derived = with_efficiency(table, meta)
            if set(derived.columns) - set(table.columns):  # a board written before its derived columns existed
                _write_csv(derived, path)
            table = derived
        summary = with_efficiency(summarise(table, primary, meta.get("groups", {}), meta.get("higher_is_better", True)),
                                  meta, summary=True)
        _write_csv(summary, path.with_name(f"{path.stem}-summary.csv"))
        written.append(path.with_name(f"{path.stem}-summary.csv"))
        synthetic = "synthetic" in set(table["data_source"].astype(str))
        title = f"{path.stem}" + (" (synthetic data: the harness's built-in suite)" if synthetic else "")
        # every entry its own line: pivot_table would average two entries that share a method and backbone
        pivot = keyed(table).pivot_table(index=ENTRY_KEY, columns="task", values=f"{primary}_mean")
        # each entry by its method name, with what tells it apart from the method's other entries
        pivot.index = pd.Index(entry_labels(pivot.index.to_frame(index=False), _ENTRY_PARTS), name="entry")
        # the references every entry is read against, where the rows carry them (RL: the data's expert on the
        # same episodes, and the pretrained model before any fine-tuning)
        for col, name in ((f"expert_{primary}_mean", "(expert ceiling)"),
                          (f"pretrained_{primary}_mean", "(pretrained, not fine-tuned)")):
            if col in table:
                pivot.loc[name] = table.groupby("task")[col].mean().reindex(pivot.columns)
        shown = summary.assign(budget=summary["budget"].map(budget_label)) if "budget" in summary else summary
        md = [f"# {title}", "", f"Ranked by `{primary}` (mean over seeds; per task, the best settings).", "",
              "## Summary", "", _md_safe(shown).to_markdown(index=False, floatfmt=".3f"), "",
              "## Per task", "", _md_safe(pivot).to_markdown(floatfmt=".3f"), ""]
        write_if_changed(path.with_suffix(".md"), "\n".join(md))
        written.append(path.with_suffix(".md"))

        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(summary) + 2), 3.5))
        avg, se = summary[f"average_{primary}"], summary[f"average_{primary}_se"].fillna(0)
        # bars on a categorical axis: two entries under one name would be drawn over each other
        labels = entry_labels(summary, _ENTRY_PARTS)
        ax.bar(labels, avg, yerr=se, capsize=4, color="tab:blue")
        ax.set_ylabel(f"average {primary}")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        written.append(_save_fig(fig, path.with_name(f"{path.stem}-{primary}.png")))
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 3.5))
        x = summary["trainable_params"].clip(lower=1)
        ax.scatter(x, avg)
        for xi, yi, name in zip(x, avg, labels):
            ax.annotate(name, (xi, yi), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (method's own, head excluded)")
        ax.set_ylabel(f"average {primary}")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        written.append(_save_fig(fig, path.with_name(f"{path.stem}-params.png")))
        plt.close(fig)
    return written


def md_text(value: Any) -> Any:
    """A CSV cell as markdown text: HTML escaped (a hand-edited CSV's ``<script>`` shows as text wherever the
    markdown is rendered, as the site shows it) and ``|`` escaped so a cell cannot split a table row."""
    if not isinstance(value, str):
        return value
    from html import escape

    return escape(value, quote=False).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _md_safe(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every text cell, header and index label passed through :func:`md_text`."""
    out = df.map(md_text)
    out.columns = pd.Index([md_text(c) for c in out.columns], name=md_text(out.columns.name))
    if isinstance(out.index, pd.MultiIndex):
        out.index = pd.MultiIndex.from_tuples([tuple(md_text(x) for x in t) for t in out.index],
                                              names=[md_text(n) for n in out.index.names])
    else:
        out.index = pd.Index([md_text(x) for x in out.index], name=md_text(out.index.name))
    return out


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    # no creation time or software version in the file: a plot of unchanged rows keeps its bytes
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    write_if_changed(path, buf.getvalue())
    return path

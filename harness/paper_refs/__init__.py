"""The papers' own published numbers, kept as data beside the package, and the rule that puts one beside
a leaderboard row.

Each CSV in this folder is one table of one paper (``eva_table4.csv``: EVA Table 4, CW10 success per task
and the mean; ``glora_table1.csv``: GLoRA Table 1, VTAB-1K top-1 per task, per group and the average).
A row names its source (``paper``, ``table``), what it scores (``benchmark``, ``method``, ``task``,
``metric``, ``value``, ``se``) and the protocol it ran under: ``backbone`` (a timm name or the DT's
description), ``targets`` (comma-joined module names, empty where the paper does not state them) and
``budget`` (a JSON mapping of budget keys or method settings, e.g. ``{"steps": 100000}`` or
``{"ranks": [8, 4]}``; empty where the paper states none). ``note`` says where a value was derived rather
than printed.

A reference sits beside one of our rows only when the protocol matches (:func:`match`); it is shown, never
averaged into our numbers. RandLoRA's and EigenLoRA's tables are not here: their protocols (CLIP and
DINOv2 on per-dataset splits of their own; EigenLoRA's class-disjoint sub-datasets of CIFAR100, Food101
and Flowers102) match no benchmark the harness runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd

COLUMNS = ["paper", "table", "benchmark", "method", "task", "metric", "value", "se", "backbone", "targets",
           "budget", "note"]


@dataclass(frozen=True)
class Reference:
    """One published number and the protocol it was measured under."""

    paper: str
    table: str
    benchmark: str
    method: str
    task: str  # a task, a group name, or "average"
    metric: str
    value: float
    se: float | None
    backbone: str
    targets: str
    budget: str
    note: str

    @property
    def source(self) -> str:
        return f"{self.paper}, {self.table}"


def _cell(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


@lru_cache(maxsize=1)
def load_references() -> tuple[Reference, ...]:
    """Every reference row of every table shipped with the package."""
    out: list[Reference] = []
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".csv"):
            continue
        with entry.open() as f:
            table = pd.read_csv(f, dtype={"targets": str, "budget": str, "note": str})
        missing = set(COLUMNS) - set(table.columns)
        if missing:
            raise ValueError(f"paper reference table {entry.name} lacks columns {sorted(missing)}")
        for r in table.to_dict("records"):
            se = r["se"]
            out.append(Reference(
                paper=str(r["paper"]), table=str(r["table"]), benchmark=str(r["benchmark"]),
                method=str(r["method"]), task=str(r["task"]), metric=str(r["metric"]), value=float(r["value"]),
                se=None if pd.isna(se) else float(se), backbone=str(r["backbone"]), targets=_cell(r["targets"]),
                budget=_cell(r["budget"]), note=_cell(r["note"])))
    return tuple(out)


def _target_set(text: str) -> frozenset[str]:
    return frozenset(t.strip() for t in str(text).split(",") if t.strip())


def _json(text: Any) -> dict[str, Any]:
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def protocol_mismatch(ref: Reference, row: dict[str, Any]) -> str:
    """Why ``ref`` does not match a leaderboard ``row`` ("" when it does).

    The row must be on real data; its backbone's model name (the part before ``[weights]``) must equal
    the reference's, with pretrained weights (not ``random`` nor the harness's own ``builtin`` ones) and no
    qualifier after them (``[weights; how it was scored]``, e.g. a DT's return target other than the papers');
    where the reference states targets, the row's must be the same set; where it states a budget, each
    key must equal the row's budget or chosen settings.
    """
    if str(row.get("data_source", "")) != "real":
        return "our row is on synthetic data"
    backbone = str(row.get("backbone", ""))
    name, _, weights = backbone.partition(" [")
    weights, _, qualifiers = weights.rstrip("]").partition("; ")
    if name.strip() != ref.backbone:
        return f"backbone: ours {name.strip()!r}, the paper's {ref.backbone!r}"
    if weights == "random" or weights.startswith("builtin"):
        return f"backbone weights: ours {weights!r}, the paper's are pretrained"
    if qualifiers:
        return f"backbone: ours with {qualifiers}, the paper's as published"
    if ref.targets:
        ours = _target_set(row.get("targets", ""))
        if ours != _target_set(ref.targets):
            return f"targets: ours {','.join(sorted(ours)) or '(not recorded)'}, the paper's {ref.targets}"
    want = _json(ref.budget)
    if want:
        have = {**_json(row.get("settings")), **_json(row.get("budget"))}
        for key, value in want.items():
            if have.get(key) != value:
                return f"{key}: ours {have.get(key, '(not recorded)')!r}, the paper's {value!r}"
    return ""


def match(benchmark: str, method: str, task: str, metric: str, row: dict[str, Any]) -> list[Reference]:
    """The references for (benchmark, method, task, metric) whose protocol matches ``row``."""
    return [r for r in load_references()
            if (r.benchmark, r.method, r.task, r.metric) == (benchmark, method, task, metric)
            and not protocol_mismatch(r, row)]


def for_benchmark(benchmark: str) -> list[Reference]:
    """Every reference number published for ``benchmark``."""
    return [r for r in load_references() if r.benchmark == benchmark]


__all__ = ["COLUMNS", "Reference", "for_benchmark", "load_references", "match", "protocol_mismatch"]

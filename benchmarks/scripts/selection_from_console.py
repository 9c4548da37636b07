"""Recover ``bench selection``'s comparison from its console log, for a run whose results folder was lost.

``python benchmarks/scripts/selection_from_console.py LOG[.gz] [--out FILE]``

The H200 run of the fifth session of 2026-12-01 ran out of device time during the scheduler half, and the
machine was handed back with the results folder; only the console output (Ray Tune's per-trial result
tables) came back. This reads those tables: each trial's last result (its held-out ``success`` and, under
the scheduler, the ``selection_update`` it reached), rebuilds the records the harness would have written
(task, method, settings, status, updates) and compares, for every (method, task) group that finished in both
runs, the selection updates each spent and the settings each chose with the harness's own selection rule
(``harness.driver._best_groups``). A group that the scheduler run did not finish is listed, not compared.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harness.driver import _best_groups  # noqa: E402

_RUN = re.compile(r"View detailed results here: \S*/(grid|scheduler)/[^/]+/[^/]+-(select|final)\b")
_TABLE = re.compile(r"│ Trial (\S+) (?:result|finished iteration \d+.*?)\s*│")
_ROW = re.compile(r"│ (\w+)\s+(\S.*?)\s*│$")
_NAME = re.compile(r"(?P<task>.+?)_(?P<method>[a-z-]+)_(?P<point>.*)_s(?P<seed>\d+)$")


def last_results(lines: list[str]) -> dict[tuple[str, str], dict[str, str]]:
    """(run, trial name) -> the rows of its last result table in the log; run is e.g. ``grid-select``."""
    run, cur, out = None, None, {}
    for line in lines:
        if m := _RUN.search(line):
            run = f"{m.group(1)}-{m.group(2)}"
        if m := _TABLE.match(line):
            cur = out.setdefault((run, m.group(1)), {})
            continue
        if cur is not None:
            if m := _ROW.match(line):
                cur[m.group(1)] = m.group(2)
            if line.startswith("╰"):
                cur = None
    return out


def _settings(point: str, default_r: int) -> dict[str, Any]:
    """``lr0.0001-r4`` -> {lr: 1e-4, r: 4}; a point's name leaves out values equal to the study's own."""
    settings: dict[str, Any] = {"r": default_r}
    for part in point.split("-"):
        key = re.match(r"[a-z_]+", part).group(0)
        settings[key] = float(part[len(key):]) if key == "lr" else int(part[len(key):])
    return settings


def records(results: dict[tuple[str, str], dict[str, str]], max_t: int, default_r: int) -> list[dict[str, Any]]:
    """The selection-stage records, as the harness writes them (the fields its selection rule reads)."""
    out = []
    for (run, name), rows in results.items():
        if not run or not run.endswith("-select") or "success" not in rows:
            continue
        m = _NAME.match(name)
        reached = int(rows.get("selection_update") or max_t)
        extra = {"updates": reached, **({"stopped_at_update": reached} if reached < max_t else {})}
        out.append({"run": run.split("-")[0], "trial": name, "task": m["task"], "method": m["method"],
                    "seed": int(m["seed"]), "settings": json.dumps(_settings(m["point"], default_r), sort_keys=True),
                    "status": "ok", "success": float(rows["success"]), "extra": json.dumps(extra)})
    return out


def compare(recs: list[dict[str, Any]], group_size: int) -> dict[str, Any]:
    """Per (method, task) finished in both runs: updates and choices; totals over those groups."""
    by_run = {run: [r for r in recs if r["run"] == run] for run in ("grid", "scheduler")}
    chosen = {run: _best_groups(rs, "success", True) for run, rs in by_run.items()}
    pairs, unfinished = [], []
    keys = sorted({(r["method"], r["task"]) for r in recs})
    for key in keys:
        groups = {run: [r for r in rs if (r["method"], r["task"]) == key] for run, rs in by_run.items()}
        if any(len(g) < group_size for g in groups.values()):
            reported = {k: len(g) for k, g in groups.items()}
            unfinished.append({"method": key[0], "task": key[1], "trials_reported": reported})
            continue
        grid_scores = {r["settings"]: r["success"] for r in groups["grid"]}
        spent = {run: sum(json.loads(r["extra"])["updates"] for r in g) for run, g in groups.items()}
        pick = {run: chosen[run][key][0] for run in groups}
        pairs.append({"method": key[0], "task": key[1], "grid_updates": spent["grid"],
                      "scheduler_updates": spent["scheduler"],
                      "update_ratio": round(spent["grid"] / spent["scheduler"], 2),
                      "grid_choice": json.loads(pick["grid"]), "scheduler_choice": json.loads(pick["scheduler"]),
                      "same_choice": pick["grid"] == pick["scheduler"], "grid_best_score": max(grid_scores.values()),
                      "grid_score_of_scheduler_choice": grid_scores[pick["scheduler"]],
                      "equally_good": grid_scores[pick["scheduler"]] == max(grid_scores.values()),
                      "scheduler_reached": {r["trial"]: json.loads(r["extra"])["updates"]
                                            for r in groups["scheduler"]}})
    grid, sched = sum(p["grid_updates"] for p in pairs), sum(p["scheduler_updates"] for p in pairs)
    return {"pairs": pairs, "unfinished": unfinished,
            "total": {"groups_compared": len(pairs), "grid_updates": grid, "scheduler_updates": sched,
                      "update_ratio": round(grid / sched, 2) if sched else None,
                      "same_choice": sum(p["same_choice"] for p in pairs),
                      "equally_good": sum(p["equally_good"] for p in pairs)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--max-t", type=int, default=1000, help="the selection budget's updates")
    ap.add_argument("--group-size", type=int, default=12, help="grid points x selection seeds per (method, task)")
    ap.add_argument("--default-r", type=int, default=8, help="the rank a trial's name leaves out")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    opener = gzip.open if args.log.endswith(".gz") else open
    with opener(args.log, "rt", errors="replace") as f:
        lines = f.read().splitlines()
    recs = records(last_results(lines), args.max_t, args.default_r)
    result = {"log": args.log, **compare(recs, args.group_size), "records": recs}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps(result["total"], indent=1))
    for p in result["pairs"]:
        print(p["method"], p["task"], p["grid_updates"], p["scheduler_updates"], p["grid_choice"],
              p["scheduler_choice"], "same" if p["same_choice"] else "differs",
              "equally good" if p["equally_good"] else "worse")
    for u in result["unfinished"]:
        print("unfinished:", u)


if __name__ == "__main__":
    main()

"""`python -m harness bench selection`: the same study's selection grid in full and under ASHA, compared
(updates spent, settings chosen), run as a user runs it from a working folder with relative paths."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.bench_selection import compare

ROOT = Path(__file__).resolve().parents[1]

def test_bench_selection_compares_the_full_grid_with_asha(selection_bench):
    """tests/conftest.py runs the command (a working folder, relative paths): the full grid of ``full``'s four
    learning rates against ASHA over them, and ``linear`` at one point beside them."""
    bench = selection_bench
    done = bench.done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    tmp_path, steps, lrs = bench.folder, bench.steps, bench.lrs
    result = json.loads((tmp_path / "sel.json").read_text())["result"]
    assert [(p["method"], p["task"]) for p in result["pairs"]] == [("full", "shapes")]
    pair = result["pairs"][0]
    assert pair["grid_trials"] == pair["scheduler_trials"] == len(lrs)
    assert result["grid_updates"] == steps * len(lrs)  # the full grid trains every point to the end
    assert result["scheduler_updates"] < result["grid_updates"] and result["update_ratio"] > 1
    # what the grid chose is the best full-budget selection score: read back from its own records
    select = bench.select_records("grid")
    best = max(select, key=lambda r: r["top1"])
    assert pair["grid_chosen"]["lr"] == json.loads(best["settings"])["lr"]
    assert pair["same_choice"] == (pair["grid_chosen"] == pair["scheduler_chosen"]) and result["compared"] == 1
    # the same command again keeps both finished runs: nothing is trained twice. Through the command line's
    # entry point in this process (what `python -m harness` calls): a run it started would fail the test
    from harness.cli import main

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(tmp_path)
        mp.setenv("HARNESS_CACHE", bench.env["HARNESS_CACHE"])
        mp.setattr("harness.bench_selection.run_logged", lambda *a, **k: pytest.fail(f"ran {a[0]} again"))
        code = main(bench.command[3:])
    assert code == 0 and err.getvalue().count("finished earlier, kept") == 2, err.getvalue()[-3000:]
    assert json.loads((tmp_path / "sel.json").read_text())["result"] == result


def test_compare_counts_stopped_trials_where_they_stopped(tmp_path):
    def write(folder: Path, select: list[dict], final: list[dict]) -> None:
        folder.mkdir(parents=True)
        (folder / "s-select-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in select))
        (folder / "s-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in final))

    def rec(lr: float, stopped: int | None = None, **kw) -> dict:
        extra = {"updates": 100} if stopped is None else {"stopped_at_update": stopped}
        return {"method": "lora", "task": "hammer", "settings": json.dumps({"lr": lr}), "extra": json.dumps(extra),
                "seed": 0, **kw}

    write(tmp_path / "g", [rec(0.1), rec(0.2)], [rec(0.2, success=0.5)])
    write(tmp_path / "s", [rec(0.1, stopped=25), rec(0.2)], [rec(0.1, success=0.25)])
    out = compare(tmp_path / "g", tmp_path / "s", "success")
    assert (out["grid_updates"], out["scheduler_updates"], out["update_ratio"]) == (200, 125, 1.6)
    assert out["pairs"][0]["same_choice"] is False and out["same_choice"] == 0 and out["compared"] == 1
    assert out["pairs"][0]["grid_final_success"] == 0.5 and out["pairs"][0]["scheduler_final_success"] == 0.25


def test_compare_says_when_the_schedulers_choice_ties_the_grids_best(tmp_path):
    """Held-out scores on 10 episodes tie often: a different choice that scored the grid's best in the grid's
    own selection is 'equally good'; one that scored lower there is not."""
    def write(folder: Path, select: list[dict], final: list[dict]) -> None:
        folder.mkdir(parents=True)
        (folder / "s-select-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in select))
        (folder / "s-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in final))

    def rec(task: str, lr: float, success: float, stopped: int | None = None) -> dict:
        extra = {"updates": 100} if stopped is None else {"stopped_at_update": stopped}
        return {"method": "lora", "task": task, "settings": json.dumps({"lr": lr}), "extra": json.dumps(extra),
                "seed": 0, "status": "ok", "success": success}

    grid = [rec(t, lr, s) for t, lr, s in (("a", 0.1, 0.9), ("a", 0.2, 0.9), ("a", 0.4, 0.5),
                                           ("b", 0.1, 0.3), ("b", 0.2, 0.1), ("b", 0.4, 0.0))]
    write(tmp_path / "g", grid, [rec("a", 0.1, 0.8), rec("b", 0.1, 0.2)])
    write(tmp_path / "s", [rec("a", 0.2, 0.9), rec("a", 0.4, 0.4, stopped=25), rec("b", 0.2, 0.2),
                           rec("b", 0.1, 0.0, stopped=25)], [rec("a", 0.2, 0.7), rec("b", 0.2, 0.1)])
    out = compare(tmp_path / "g", tmp_path / "s", "success")
    a, b = out["pairs"]
    assert (a["same_choice"], a["equally_good"], a["grid_score_of_scheduler_choice"]) == (False, True, 0.9)
    assert (b["same_choice"], b["equally_good"], b["grid_best_score"], b["grid_score_of_scheduler_choice"]) == (
        False, False, 0.3, 0.1)
    assert (out["same_choice"], out["equally_good"], out["compared"]) == (0, 1, 2)
    # lower is better: the grid's best is its lowest score
    low = compare(tmp_path / "g", tmp_path / "s", "success", higher_is_better=False)
    assert low["pairs"][1]["grid_best_score"] == 0.0 and low["pairs"][0]["equally_good"] is False


def test_compare_without_a_final_stage_takes_the_sweeps_choice_from_selection(tmp_path):
    """``final: false``: no final records; each run's choice is what the sweep's rule picks from its selection
    records (the furthest-trained settings first, then the score)."""
    def rec(lr: float, success: float, stopped: int | None = None) -> dict:
        extra = {"updates": 100} if stopped is None else {"stopped_at_update": stopped}
        return {"method": "lora", "task": "a", "settings": json.dumps({"lr": lr}), "extra": json.dumps(extra),
                "seed": 0, "status": "ok", "success": success}

    for name, recs in (("g", [rec(0.1, 0.5), rec(0.2, 0.7), rec(0.4, 0.6)]),
                       ("s", [rec(0.1, 0.5), rec(0.2, 0.9, stopped=25), rec(0.4, 0.6)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "s-select-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pair = compare(tmp_path / "g", tmp_path / "s", "success")["pairs"][0]
    # the scheduler run's 0.9 came at a rung, before the others' full-budget scores: it does not compete
    assert (pair["grid_chosen"], pair["scheduler_chosen"]) == ({"lr": 0.2}, {"lr": 0.4})
    assert pair["same_choice"] is False and pair["equally_good"] is False and "grid_final_success" not in pair


def test_sweep_selection_only_then_resume_trains_the_final_stage(tmp_path):
    """``sweep --selection-only`` from a working folder (relative paths): the selection stage runs, its choice
    is printed, the board folder is not touched; the same command with ``--resume`` keeps those trials and
    trains the final stage on the chosen setting."""
    from tests.test_selection_scheduler import TINY

    doc = {"name": "so", "track": "vision", "benchmark": "builtin", "tasks": ["shapes"],
           "protocol": "select-then-final", "seeds": [0], "selection": {"seeds": [0]},
           "methods": {"full": {"lr": [1.0e-9, 1.0e-1]}}, "budget": {"steps": 4, "batch_size": 8},
           "settings": TINY, "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 2}}
    (tmp_path / "so.yaml").write_text(yaml.safe_dump(doc))
    env = dict(os.environ, HARNESS_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    base = [sys.executable, "-m", "harness", "sweep", "so.yaml", "--results", "res", "--leaderboard", "board",
            "--no-dashboard"]
    first = subprocess.run([*base, "--selection-only"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    select = tmp_path / "res" / "so" / "so-select-records.jsonl"
    before = [json.loads(x) for x in select.read_text().splitlines()]
    assert len(before) == 2 and not (tmp_path / "res" / "so" / "so-records.jsonl").exists()
    assert not (tmp_path / "board").exists() or not any((tmp_path / "board").iterdir())
    best = max(before, key=lambda r: r["top1"])
    assert f"full shapes: {json.dumps(json.loads(best['settings']), sort_keys=True)}" in first.stdout
    again = subprocess.run([*base, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = [json.loads(x) for x in select.read_text().splitlines()]
    stamp = lambda rs: sorted((r["settings"], r["date"], r["wall_time_s"]) for r in rs)  # noqa: E731
    assert stamp(after) == stamp(before)  # kept, not trained again
    final = [json.loads(x) for x in (tmp_path / "res" / "so" / "so-records.jsonl").read_text().splitlines()]
    assert [json.loads(r["settings"])["lr"] for r in final] == [json.loads(best["settings"])["lr"]]
    assert any((tmp_path / "board").rglob("*.csv"))


def test_selection_only_refuses_a_study_without_a_selection_stage(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["sweep", str(ROOT / "sweeps" / "quickstart.yaml"), "--selection-only", "--results", "r",
                 "--leaderboard", "b", "--no-dashboard"])
    err = capsys.readouterr().err
    assert code != 0 and "--selection-only: studies rl, vision" in err and "--only STUDY" in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "b").exists()

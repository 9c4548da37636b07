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
TINY = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 2},
        "drop_path": 0.0, "weights": "random", "threads": 1}
STEPS, GRACE = 8, 2
LRS = [1.0e-9, 3.0e-2, 1.0e-1]


def test_bench_selection_compares_the_full_grid_with_asha(tmp_path):
    doc = {"name": "sel", "track": "vision", "benchmark": "builtin", "tasks": ["shapes"],
           "protocol": "select-then-final", "seeds": [0],
           "selection": {"seeds": [0], "scheduler": "asha", "grace_period": GRACE, "reduction_factor": 2},
           "methods": {"full": {"lr": LRS}, "linear": {"lr": [1.0e-2]}},  # linear: one point, no selection
           "budget": {"steps": STEPS, "batch_size": 8}, "settings": TINY,
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1}}
    (tmp_path / "sel.yaml").write_text(yaml.safe_dump(doc))
    env = dict(os.environ, HARNESS_CACHE=str(tmp_path / "cache"), RAY_DEDUP_LOGS="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "harness", "bench", "selection", "--set", "file=sel.yaml", "--set", "workdir=work",
           "--out", "sel.json"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "sel.json").read_text())["result"]
    assert [(p["method"], p["task"]) for p in result["pairs"]] == [("full", "shapes")]
    pair = result["pairs"][0]
    assert pair["grid_trials"] == pair["scheduler_trials"] == len(LRS)
    assert result["grid_updates"] == STEPS * len(LRS)  # the full grid trains every point to the end
    assert result["scheduler_updates"] < result["grid_updates"] and result["update_ratio"] > 1
    # what the grid chose is the best full-budget selection score: read back from its own records
    select = [json.loads(x) for x in next((tmp_path / "work" / "grid").rglob("*-select-records.jsonl"))
              .read_text().splitlines()]
    best = max(select, key=lambda r: r["top1"])
    assert pair["grid_chosen"]["lr"] == json.loads(best["settings"])["lr"]
    assert pair["same_choice"] == (pair["grid_chosen"] == pair["scheduler_chosen"]) and result["compared"] == 1
    # the same command again keeps both finished runs: nothing is trained twice. Through the command line's
    # entry point in this process (what `python -m harness` calls): a run it started would fail the test
    from harness.cli import main

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(tmp_path)
        mp.setenv("HARNESS_CACHE", env["HARNESS_CACHE"])
        mp.setattr("harness.bench_selection.run_logged", lambda *a, **k: pytest.fail(f"ran {a[0]} again"))
        code = main(cmd[3:])
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

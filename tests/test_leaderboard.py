"""Leaderboard aggregation: best settings per row (method, task, backbone, targets, selection, budget), mean and SE
over seeds, merge without duplicates, rows that differ in targets or selection kept apart."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from harness.leaderboard import aggregate, budget_label, summarise, update
from harness.site import render
from harness.sweep_file import Study


def rec(method, task, seed, score, settings=None, status="ok", **extra):
    return {"track": "vision", "benchmark": "builtin", "task": task, "method": method,
            "settings": json.dumps(settings or {}, sort_keys=True), "seed": seed, "status": status, "error": "",
            "trainable_params": 100, "head_params": 10, "peak_memory_mb": 0.0, "wall_time_s": 1.0,
            "backbone": "vit", "data_source": "synthetic", "adapter_path": "", "harness_version": "0",
            "date": "2026-11-23", "budget": "{}", "top1": score, "extra": "{}", **extra}


def test_aggregate_picks_best_settings_and_computes_se():
    records = [rec("lora", "a", s, v, {"r": 2}) for s, v in enumerate([0.5, 0.6, 0.7])]
    records += [rec("lora", "a", s, v, {"r": 4}) for s, v in enumerate([0.8, 0.9, 1.0])]
    records += [rec("lora", "a", 9, float("nan"), {"r": 8}, status="failed")]
    table = aggregate(records, "top1", {})
    (row,) = table.to_dict("records")
    assert json.loads(row["settings"]) == {"r": 4}
    assert row["top1_mean"] == pytest.approx(0.9)
    assert row["top1_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert row["n_seeds"] == 3


def test_summary_averages_group_means():
    groups = {"natural": ["a", "b"], "structured": ["c"]}
    records = [rec("full", t, 0, v) for t, v in (("a", 0.2), ("b", 0.4), ("c", 0.9))]
    summary = summarise(aggregate(records, "top1", groups), "top1", groups)
    (row,) = [r for _, r in summary.iterrows()]
    assert row["natural_top1"] == pytest.approx(0.3)
    assert row["structured_top1"] == pytest.approx(0.9)
    assert row["average_top1"] == pytest.approx(0.6)  # mean of the group means, not of the tasks


def test_summary_keeps_backbones_apart():
    records = [rec("linear", "a", 0, 0.2), {**rec("linear", "a", 0, 0.5), "backbone": "random"}]
    summary = summarise(aggregate(records, "top1", {}), "top1", {})
    assert sorted(summary["backbone"]) == ["random", "vit"]
    assert sorted(summary["average_top1"]) == [0.2, 0.5]


def test_update_merges_without_duplicates_and_renders(tmp_path):
    study = Study(name="s", track="vision", benchmark="builtin", methods={"full": {}}, leaderboard="board")

    update([rec("full", "a", 0, 0.5), rec("linear", "a", 0, 0.3)], study, tmp_path)
    update([rec("full", "a", 0, 0.7), rec("full", "a", 1, 0.9)], study, tmp_path)
    table = pd.read_csv(tmp_path / "board.csv")
    assert len(table) == 2  # full/a replaced, linear/a kept
    assert table.set_index("method").loc["full", "top1_mean"] == pytest.approx(0.8)
    assert (table["data_source"] == "synthetic").all()
    written = render(tmp_path)
    assert (tmp_path / "board.md").read_text().count("synthetic") >= 1
    assert any(p.suffix == ".png" for p in written)


def test_efficiency_columns_and_site(tmp_path):
    study = Study(name="s", track="vision", benchmark="builtin", methods={"lora": {}}, leaderboard="board")
    costs = {"train_reserved_memory_mb": 300.0, "train_mean_reserved_mb": 250.0, "adapter_bytes": 4096}
    update([rec("lora", "a", s, v, **{**costs, "train_mean_reserved_mb": 250.0 + 10 * s})
            for s, v in enumerate([60.0, 70.0])], study, tmp_path)
    (row,) = pd.read_csv(tmp_path / "board.csv").to_dict("records")
    assert row["train_reserved_memory_mb"] == 300.0 and row["adapter_bytes"] == 4096
    assert row["train_mean_reserved_mb"] == pytest.approx(255.0)  # the mean over seeds
    # V-PETL Bench's PPT from the row's mean top-1 and its trainable parameters (100 here)
    assert row["ppt"] == pytest.approx(65.0 * math.exp(-math.log10(100 / 1e7 + 1)))
    summary = pd.read_csv(tmp_path / "board-summary.csv")
    assert summary["ppt"].iloc[0] == pytest.approx(row["ppt"])
    written = render(tmp_path)
    assert tmp_path / "index.html" in written and tmp_path / "board.html" in written


def test_rl_rows_show_the_expert_ceiling_beside_the_score(tmp_path):
    study = Study(name="s", track="rl", benchmark="cw10", methods={"lora": {}}, leaderboard="rlboard")
    rl = [{**rec("lora", "push-back", s, None), "track": "rl", "benchmark": "cw10", "data_source": "real",
           "success": v, "expert_success": 0.8} for s, v in enumerate([0.6, 0.8])]
    update(rl, study, tmp_path)
    (row,) = pd.read_csv(tmp_path / "rlboard.csv").to_dict("records")
    assert row["success_mean"] == pytest.approx(0.7) and row["expert_success_mean"] == pytest.approx(0.8)
    render(tmp_path)
    page = (tmp_path / "rlboard.html").read_text()
    assert "expert ceiling" in page and "0.8" in page.split("expert ceiling", 1)[1]


# --- row identity: (method, task, backbone, targets, selection) ----------------------------------------

QV, ALL = "attn.qkv.q,attn.qkv.v", "attn.qkv,attn.proj,mlp.fc1,mlp.fc2"


def _study() -> Study:
    return Study(name="s", track="vision", benchmark="builtin", methods={"lora": {}}, leaderboard="board")


@pytest.mark.parametrize("column, first, second", [("targets", QV, ALL), ("selection", "on-reported", "held-out")])
def test_studies_differing_in_targets_or_selection_sit_side_by_side(tmp_path, column, first, second):
    study = _study()
    update([rec("lora", "a", s, v, **{column: first}) for s, v in enumerate([0.5, 0.7])], study, tmp_path)
    update([rec("lora", "a", s, v, **{column: second}) for s, v in enumerate([0.8, 1.0])], study, tmp_path)
    table = pd.read_csv(tmp_path / "board.csv")
    assert len(table) == 2  # neither study hides the other's result
    assert table.set_index(column)["top1_mean"].to_dict() == pytest.approx({first: 0.6, second: 0.9})
    summary = pd.read_csv(tmp_path / "board-summary.csv")
    assert summary.set_index(column)["average_top1"].to_dict() == pytest.approx({first: 0.6, second: 0.9})

    # a rerun of the first study replaces its own row only
    update([rec("lora", "a", s, v, **{column: first}) for s, v in enumerate([0.2, 0.4])], study, tmp_path)
    table = pd.read_csv(tmp_path / "board.csv")
    assert len(table) == 2
    assert table.set_index(column)["top1_mean"].to_dict() == pytest.approx({first: 0.3, second: 0.9})
    assert len(pd.read_csv(tmp_path / "board-summary.csv")) == 2

    # every view of the board shows both rows and tells them apart
    render(tmp_path)
    labels = {f"lora [{first}]", f"lora [{second}]"}
    html = (tmp_path / "board.html").read_text()
    assert all(html.count(f">{label}<") == 2 for label in labels)  # the summary row and the per-task row
    # a point each in the parameters plot (the records carry no memory or time, so no other plot is drawn)
    assert all(html.count(f">{label} (synthetic)</text>") == 1 for label in labels)
    md = (tmp_path / "board.md").read_text()
    assert first in md and second in md and "0.300" in md and "0.900" in md


def test_aggregate_keeps_targets_apart_within_one_study():
    records = [rec("lora", "a", 0, 0.5, targets=QV), rec("lora", "a", 0, 0.9, targets=ALL), rec("full", "a", 0, 0.7)]
    table = aggregate(records, "top1", {})
    assert sorted(zip(table["method"], table["targets"], table["top1_mean"])) == [
        ("full", "", 0.7), ("lora", ALL, 0.9), ("lora", QV, 0.5)]
    summary = summarise(table, "top1", {})
    assert len(summary) == 3 and sorted(summary["average_top1"]) == pytest.approx([0.5, 0.7, 0.9])


@pytest.mark.parametrize("dropped", [["targets"], ["targets", "selection"]])
def test_an_old_board_without_targets_or_selection_merges_by_the_same_key(tmp_path, dropped):
    study = _study()
    selection = "" if "selection" in dropped else "single-point"
    update([rec("full", "a", 0, 0.5, selection=selection), rec("lora", "a", 0, 0.3, selection=selection)],
           study, tmp_path)
    old = pd.read_csv(tmp_path / "board.csv")
    # as a board written before the columns existed (without ``targets`` the old code wrote none)
    old.drop(columns=dropped, errors="ignore").to_csv(tmp_path / "board.csv", index=False)
    update([rec("full", "a", 0, 0.6, targets="", selection=selection),
            rec("lora", "a", 0, 0.8, targets=QV, selection=selection)], study, tmp_path)
    table = pd.read_csv(tmp_path / "board.csv", keep_default_na=False)
    # full: the old row (no targets column) and the new one (targets "") are one row, the new value in it;
    # lora on q,v is another row than the old lora row, whose targets were never recorded
    assert sorted(zip(table["method"], table["targets"], table["top1_mean"])) == [
        ("full", "", 0.6), ("lora", "", 0.3), ("lora", QV, 0.8)]
    assert len(pd.read_csv(tmp_path / "board-summary.csv")) == 3


def test_a_short_budget_sits_beside_the_full_one_and_says_so(tmp_path):
    """Two studies that differ only in their budget keep a row each; logging cadence and the stage do not
    split a row; every view names each row's budget in words, and an RL board's per-task markdown shows
    the expert ceiling and the pretrained model beside the entries."""
    study = Study(name="s", track="rl", benchmark="cw10", methods={"lora": {}}, leaderboard="rlb")
    short = {"steps": 3000, "batch_size": 128, "eval_episodes": 10, "report_every": 50, "stage": "final"}

    def rl(seed, value, budget):
        return {**rec("lora", "push-back", seed, None), "track": "rl", "benchmark": "cw10", "data_source": "real",
                "success": value, "expert_success": 0.8, "pretrained_success": 0.3,
                "budget": json.dumps(budget, sort_keys=True), "selection": "held-out/asha(grace_period=750)",
                "grid_size": 2}

    update([rl(s, v, short) for s, v in enumerate([0.6, 0.8])], study, tmp_path)
    update([rl(s, v, {**short, "steps": 100_000}) for s, v in enumerate([0.9, 1.0])], study, tmp_path)
    # the short study again, logging more often: the same row, replaced
    update([rl(s, v, {**short, "report_every": 10}) for s, v in enumerate([0.4, 0.6])], study, tmp_path)
    table = pd.read_csv(tmp_path / "rlb.csv")
    assert len(table) == 2
    by_steps = {json.loads(b)["steps"]: v for b, v in zip(table["budget"], table["success_mean"])}
    assert by_steps == pytest.approx({3000: 0.5, 100_000: 0.95})
    assert budget_label(table["budget"].iloc[0]).startswith(("3,000 updates", "100,000 updates"))
    assert budget_label(json.dumps({"epochs": 100, "batch_size": 64})) == "100 epochs, batch 64"
    render(tmp_path)
    html = (tmp_path / "rlb.html").read_text()
    for label in ("lora [3,000 updates, batch 128, 10 eval episodes]",
                  "lora [100,000 updates, batch 128, 10 eval episodes]"):
        assert html.count(f">{label}</td>") == 2  # the summary row and the per-task row
        assert html.count(f">{label}</text>") == 1  # its point in the parameters plot
    assert "held-out/asha(grace_period=750) of 2" in html
    md = (tmp_path / "rlb.md").read_text()
    assert "3,000 updates, batch 128, 10 eval episodes" in md and '{"batch_size"' not in md
    ceiling = next(line for line in md.splitlines() if line.startswith("| (expert ceiling)"))
    pretrained = next(line for line in md.splitlines() if line.startswith("| (pretrained, not fine-tuned)"))
    assert "0.800" in ceiling and "0.300" in pretrained

"""The static leaderboard site: every CSV row on the page, sorting reorders rows, no script error, in a
real headless Chromium (Debian's ``chromium`` through Playwright); Pareto frontiers; papers' numbers only
where the protocol matches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from harness import paper_refs
from harness.leaderboard import ppt_score, update
from harness.site import render
from harness.site.pareto import Point, pareto_front
from harness.sweep_file import Study

GLORA_BACKBONE = "vit_base_patch16_224.augreg_in21k"


def rec(method, task, seed, score, params, backbone="vit_tiny [builtin:abc]", source="synthetic", **extra):
    return {"track": "vision", "benchmark": "builtin", "task": task, "method": method,
            "settings": json.dumps(extra.pop("settings", {}), sort_keys=True), "seed": seed, "status": "ok",
            "error": "", "trainable_params": params, "head_params": 10, "peak_memory_mb": 0.0, "wall_time_s": 1.0,
            "train_peak_memory_mb": params / 1e4, "ms_per_update": 5.0 + params / 1e5, "train_reserved_memory_mb": 0.0,
            "train_mean_reserved_mb": 0.0, "adapter_bytes": 4 * params, "backbone": backbone, "data_source": source,
            "adapter_path": "", "harness_version": "0", "date": "2026-11-23", "budget": "{}", "top1": score,
            "git_commit": "abc123", "device_name": "CPU: test", "software": '{"torch": "2.14.1"}', "extra": "{}",
            **extra}


@pytest.fixture()
def board_dir(tmp_path) -> Path:
    study = Study(name="s", track="vision", benchmark="builtin", methods={"full": {}}, leaderboard="board")
    scores = {"full": (70.0, 500_000), "lora": (66.0, 40_000), "linear": (40.0, 0), "vera": (55.0, 60_000)}
    records = [rec(m, t, s, v + i + 0.5 * s, p) for m, (v, p) in scores.items()
               for i, t in enumerate(("textures", "cells", "count")) for s in (0, 1)]
    update(records, study, tmp_path)
    render(tmp_path)
    return tmp_path


def test_pareto_front_marks_the_undominated():
    pts = [Point("a", 1, 0.5), Point("b", 10, 0.9), Point("c", 10, 0.4), Point("d", 100, 0.8), Point("e", 0.5, 0.1)]
    assert pareto_front(pts) == [True, True, False, False, True]
    assert pareto_front(pts, higher_is_better=False) == [False, False, False, False, True]


def test_ppt_follows_v_petl_bench():
    assert ppt_score(80.0, 0) == pytest.approx(80.0)
    assert ppt_score(80.0, 1e7) == pytest.approx(80.0 * 2.718281828 ** -0.30103, rel=1e-6)


def test_site_pages_are_self_contained_and_label_synthetic_rows(board_dir):
    html = (board_dir / "board.html").read_text()
    assert (board_dir / "index.html").is_file()
    # no network: nothing fetched from a URL, no external stylesheet or script
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "<script src" not in html and "<link" not in html
    assert html.count('<tr class="synthetic"') == len(pd.read_csv(board_dir / "board.csv")) + 4  # rows + summary
    assert "synthetic data: not comparable" in html.lower() or "never to be compared" in html
    assert html.count("<svg") == 3  # Pareto plots: parameters, peak memory, time per update
    table = pd.read_csv(board_dir / "board.csv")
    assert {"ppt", "adapter_bytes", "train_reserved_memory_mb", "train_mean_reserved_mb"} <= set(table.columns)


def test_papers_numbers_only_where_the_protocol_matches():
    refs = paper_refs.load_references()
    assert {r.source for r in refs} == {"EVA (Paischer et al.), Table 4", "GLoRA (Chavan et al.), Table 1"}
    (lora_avg,) = [r for r in refs if r.source.startswith("EVA") and r.method == "lora" and r.task == "average"]
    assert lora_avg.value == 0.86
    row = {"method": "glora", "task": "dtd", "data_source": "real", "backbone": f"{GLORA_BACKBONE} [/w/vit.npz]",
           "targets": "qkv,proj,fc1,fc2", "settings": json.dumps({"ranks": [8, 4]})}
    (ref,) = paper_refs.match("vtab1k", "glora", "dtd", "top1", row)
    assert ref.value == 74.6 and ref.table == "Table 1"
    assert "ranks" in paper_refs.protocol_mismatch(ref, {**row, "settings": json.dumps({"ranks": [2]})})
    assert "targets" in paper_refs.protocol_mismatch(ref, {**row, "targets": "qkv"})
    assert "synthetic" in paper_refs.protocol_mismatch(ref, {**row, "data_source": "synthetic"})
    assert "weights" in paper_refs.protocol_mismatch(ref, {**row, "backbone": f"{GLORA_BACKBONE} [random]"})
    assert "backbone" in paper_refs.protocol_mismatch(ref, {**row, "backbone": "vit_small_patch16_224 [x]"})
    # a DT scored under a return target the papers do not use (agents.track.backbone_name) is not EVA's protocol
    dt = "DecisionTransformer(layers=4, heads=8, width=512, context=50)"
    (eva,) = [r for r in refs if r.source.startswith("EVA") and r.method == "lora" and r.task == "hammer"]
    dt_row = {"method": "lora", "task": "hammer", "data_source": "real", "budget": json.dumps({"steps": 100000})}
    assert paper_refs.protocol_mismatch(eva, {**dt_row, "backbone": f"{dt} [base.safetensors@1234abcd]"}) == ""
    assert "return target success_mean" in paper_refs.protocol_mismatch(
        eva, {**dt_row, "backbone": f"{dt} [base.safetensors@1234abcd; return target success_mean]"})


def test_matching_rows_show_the_paper_and_the_difference(tmp_path):
    study = Study(name="s", track="vision", benchmark="vtab1k", methods={"lora": {}}, leaderboard="vtab")
    records = [{**rec("lora", "dtd", s, 70.0 + s, 300_000, backbone=f"{GLORA_BACKBONE} [/w/vit.npz]", source="real"),
                "benchmark": "vtab1k"} for s in (0, 1)]
    update(records, study, tmp_path)
    render(tmp_path)
    html = (tmp_path / "vtab.html").read_text()
    row = re.search(r'<tr class="real" data-method="lora".*?</tr>', html).group(0)
    assert 'title="GLoRA (Chavan et al.), Table 1"' in row and ">69.4<" in row  # LoRA on DTD in Table 1
    delta = re.search(r'class="num delta pos" data-value="([^"]+)"', row).group(1)
    assert float(delta) == pytest.approx(70.5 - 69.4)
    table = pd.read_csv(tmp_path / "vtab.csv")
    assert "69.4" not in table.to_csv()  # the paper's number is shown, never part of our table


def _open(page, path: Path) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return errors


def test_site_in_headless_chromium(board_dir):
    from harness.site.browser import open_browser, screenshots

    table = pd.read_csv(board_dir / "board.csv")
    with open_browser() as context:
        page = context.new_page()
        errors = _open(page, board_dir / "board.html")
        rows = page.locator("#rows tbody tr")
        assert rows.count() == len(table)
        shown = {(rows.nth(i).get_attribute("data-method"), rows.nth(i).get_attribute("data-task"))
                 for i in range(rows.count())}
        assert shown == set(zip(table["method"], table["task"]))  # every CSV row appears

        def column(header: str) -> list[float]:
            idx = [h.strip() for h in page.locator("#rows thead th").all_inner_texts()].index(header)
            return [float(v) for v in page.locator(f"#rows tbody tr td:nth-child({idx + 1})").evaluate_all(
                "cells => cells.map(c => c.getAttribute('data-value'))")]

        before = column("trainable params")
        page.locator("#rows thead th", has_text="trainable params").click()
        ascending = column("trainable params")
        assert ascending == sorted(before) and ascending != before
        page.locator("#rows thead th", has_text="trainable params").click()
        assert column("trainable params") == sorted(before, reverse=True)

        page.select_option('.filters[data-for="rows"] select[data-col="method"]', "lora")
        assert page.locator("#rows tbody tr:not([hidden])").count() == (table["method"] == "lora").sum()
        assert "synthetic" in page.locator("#rows tbody tr:not([hidden])").first.inner_text()

        errors += _open(page, board_dir / "index.html")
        assert page.locator("#boards tbody tr").count() == 1
        page.locator("#boards a", has_text="board").click()
        page.wait_for_load_state("load")
        assert page.url.endswith("board.html")
        assert errors == []
    shots = screenshots(board_dir, "board")
    assert [p.name for p in shots] == ["board-summary.png", "board-table.png", "board-pareto.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000 for p in shots)

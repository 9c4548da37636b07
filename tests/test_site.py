"""The static leaderboard site: every CSV row on the page, sorting reorders rows, no script error, in a
real headless Chromium (Debian's ``chromium`` through Playwright); Pareto frontiers; papers' numbers only
where the protocol matches."""

from __future__ import annotations

import html as htmllib
import json
import random
import re
from pathlib import Path

import pandas as pd
import pytest

from harness import paper_refs
from harness.leaderboard import ppt_score, update
from harness.site import render
from harness.site.pages import compact_text
from harness.site.pareto import Point, pareto_front, pareto_svg
from harness.sweep_file import Study

GLORA_BACKBONE = "vit_base_patch16_224.augreg_in21k"
# A GLoRA-like per-layer subnet: well over a thousand characters of settings, with markup-like text to escape.
LONG_SETTINGS = {"lr": 0.001, "ranks": [8, 4], "subnet": {f"blocks.{i}.<attn>&qkv": "A=vector,B=lora4,C=none,D=scalar"
                                                          for i in range(24)}}


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
    records = [rec(m, t, s, v + i + 0.5 * s, p, settings=LONG_SETTINGS if m == "vera" else {"r": 8})
               for m, (v, p) in scores.items() for i, t in enumerate(("textures", "cells", "count")) for s in (0, 1)]
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


def _cell_text(fragment: str) -> str:
    return htmllib.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_compact_text_keeps_short_text_and_collapses_long_text():
    assert compact_text('{"r": 8, "x": "<b>"}') == '{&quot;r&quot;: 8, &quot;x&quot;: &quot;&lt;b&gt;&quot;}'
    long = json.dumps(LONG_SETTINGS)
    out = compact_text(long)
    summary = re.search(r"<summary[^>]*>(.*?)</summary>", out).group(1)
    assert len(_cell_text(summary)) < 110 and long.startswith(_cell_text(summary).rstrip(" \u2026"))
    assert _cell_text(re.search(r'<div class="full">(.*?)</div>', out).group(1)) == long
    assert "<attn>" not in out and "&lt;attn&gt;" in out


def test_long_settings_collapse_behind_details_and_stay_complete(board_dir):
    page = (board_dir / "board.html").read_text()
    table = pd.read_csv(board_dir / "board.csv")
    long = table.loc[table["method"] == "vera", "settings"].iloc[0]
    assert len(long) > 1000
    rows = re.findall(r'<tr class="synthetic" data-method="vera".*?</tr>', page)
    assert len(rows) == (table["method"] == "vera").sum()
    for row in rows:
        (details,) = re.findall(r'<details class="long">.*?</details>', row)
        summary = _cell_text(re.search(r"<summary[^>]*>(.*?)</summary>", details).group(1))
        assert 20 < len(summary) < 120
        assert _cell_text(re.search(r'<div class="full">(.*?)</div>', details).group(1)) == long
    assert "<attn>" not in page  # escaped everywhere, the sort key included
    short = re.search(r'<tr class="synthetic" data-method="lora".*?</tr>', page).group(0)
    assert "<details" not in short and "{&quot;r&quot;: 8}</td>" in short


def test_search_finds_and_opens_text_kept_in_a_closed_details(board_dir):
    from harness.site.browser import open_browser

    table = pd.read_csv(board_dir / "board.csv")
    with open_browser() as context:
        page = context.new_page()
        errors = _open(page, board_dir / "board.html")
        long_row = page.locator('#rows tbody tr[data-method="vera"]').first
        short_row = page.locator('#rows tbody tr[data-method="lora"]').first
        assert not long_row.locator("details.long .full").is_visible()
        # the collapsed row is about as tall as a row of short settings, not the column of text it held
        assert long_row.bounding_box()["height"] < 3 * short_row.bounding_box()["height"]
        search = page.locator('.filters[data-for="rows"] input[type="search"]')
        search.fill("blocks.23.<attn>")  # only in the hidden part of vera's settings
        assert page.locator("#rows tbody tr:not([hidden])").count() == (table["method"] == "vera").sum()
        assert page.locator('#rows tbody tr:not([hidden])[data-method="vera"] details.long[open]').count() == \
            (table["method"] == "vera").sum()
        assert long_row.locator("details.long .full").is_visible()
        search.fill("")
        assert page.locator("#rows tbody tr:not([hidden])").count() == len(table)
        assert page.locator("#rows details.long[open]").count() == 0  # opened by the search, closed by it
        long_row.locator("details.long summary").click()  # the reader opens one: a search leaves it open
        search.fill("lora")
        search.fill("")
        assert long_row.locator("details.long[open]").count() == 1
        assert errors == []


_ASSUMED_LINE = 12.0  # px: an 11px font's line, whatever the module assumes
_ASSUMED_CHAR = 5.5  # px: a narrow guess at an 11px font's mean character width


def _svg_layout(svg: str) -> tuple[dict, list[tuple[float, float]], list[dict], int]:
    """The frame (x, y, w, h and the figure's width W), each point's circle and label box, and the leader count."""
    frame = dict(zip("xywh", map(float, re.search(
        r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)" class="frame"', svg).groups())))
    frame["W"] = float(re.search(r'viewBox="0 0 ([\d.]+) ', svg).group(1))
    circles, labels = [], []
    for group in re.findall(r'<g class="point[^"]*">.*?</g>', svg):
        circles.append(tuple(map(float, re.search(r'<circle cx="([\d.]+)" cy="([\d.]+)"', group).groups())))
        x, y, anchor, text = re.search(r'<text x="([\d.]+)" y="([\d.]+)" class="label"( text-anchor="end")?>'
                                       r"([^<]*)</text>", group).groups()
        width = _ASSUMED_CHAR * len(htmllib.unescape(text))
        x0 = float(x) - width if anchor else float(x)
        labels.append({"text": htmllib.unescape(text), "x0": x0, "x1": x0 + width,
                       "top": float(y) - 0.75 * _ASSUMED_LINE, "bottom": float(y) + 0.25 * _ASSUMED_LINE})
    return frame, circles, labels, svg.count('class="leader"')


def _assert_labels_apart_and_inside(frame: dict, labels: list[dict]) -> None:
    for a in labels:
        assert frame["y"] <= a["top"] and a["bottom"] <= frame["y"] + frame["h"], a
        assert 0 <= a["x0"] and a["x1"] <= frame["W"], a
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            apart = a["x1"] <= b["x0"] or b["x1"] <= a["x0"] or a["bottom"] <= b["top"] or b["bottom"] <= a["top"]
            assert apart, (a, b)


def test_pareto_labels_of_coinciding_points_do_not_overlap():
    names = ["pissa", "eva", "dora", "glora", "lora", "olora", "adalora", "eva-dora", "randlora", "vera"]
    # ten entries on one spot at the top of the plot (their labels must stay inside it), one far below
    points = [Point(n, 2.6e5, 0.6) for n in names] + [Point("linear", 1, 0.1)]
    svg = pareto_svg(points, "params", "score")
    frame, circles, labels, leaders = _svg_layout(svg)
    assert len(labels) == len(points) and svg.count("<title>") == len(points)
    assert len(set(circles[:len(names)])) == 1  # the points themselves stay where their numbers put them
    _assert_labels_apart_and_inside(frame, labels)
    assert leaders >= len(names) - 2  # one label each side may sit level with the spot; the rest point to it
    for x1, y1 in re.findall(r'<line x1="([\d.]+)" y1="([\d.]+)" [^>]*class="leader"', svg):
        assert abs(float(x1) - circles[0][0]) <= 6 and float(y1) == circles[0][1]  # from the point's edge
    # the same points in another order get the same spots: placement depends on the points alone
    shuffled = points[:]
    random.Random(0).shuffle(shuffled)
    again = _svg_layout(pareto_svg(shuffled, "params", "score"))[2]
    assert sorted(map(str, labels)) == sorted(map(str, again))


def test_pareto_labels_of_nearby_points_do_not_overlap_and_lone_labels_stay_put():
    near = [Point("pissa", 2.6e5, 0.600), Point("eva", 2.62e5, 0.595), Point("dora", 2.8e5, 0.59),
            Point("glora", 2.9e5, 0.59), Point("lora", 2.6e5, 0.64), Point("randlora", 1.5e5, 0.63),
            Point("full", 1.2e7, 0.75), Point("linear", 1, 0.17)]
    frame, circles, labels, _ = _svg_layout(pareto_svg(near, "params", "score"))
    _assert_labels_apart_and_inside(frame, labels)
    apart = [Point("a", 10, 0.1), Point("b", 1e4, 0.5), Point("c", 1e6, 0.9)]
    svg = pareto_svg(apart, "params", "score")
    frame, circles, labels, leaders = _svg_layout(svg)
    assert leaders == 0
    for (cx, cy), label in zip(circles, labels):  # right of its point, level with it
        assert cx < label["x0"] < cx + 15 and label["top"] < cy < label["bottom"]

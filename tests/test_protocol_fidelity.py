"""Issue 10, findings 2, 3, 5 and 6: the leaderboard compares what the papers compare.

- GLoRA's final stage reuses the subnet its selection trial searched on held-out data (never a search on
  data it trained on), and records it; its parameter budget is a setting checked before any compute;
  the VTAB-1K sweep has the paper's three budgets as three rows, 500 supernet epochs.
- RL selection is on episodes of their own start-state seeds; every row says how its settings were
  chosen (``selection``) and from how many grid points (``grid_size``).
- EigenLoRA's bank in a sweep is one LoRA adapter per other task of the study (the chosen settings,
  lowest seed), or a named folder; its manifest is in the record.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from harness.driver import check_banks, choose_settings, label_records, lora_bank, selection_methods
from harness.errors import ConfigError
from harness.methods import AdapterSite, MethodContext, get_method
from harness.methods.glora import check_budget
from harness.sweep_file import SweepFile, Study, load_sweep

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.l2(torch.relu(self.l1(x))))


SITE = AdapterSite(("l1", "l2"), ("head",))


# --- finding 2: GLoRA's final stage ---------------------------------------------------------------------

def test_glora_final_stage_trains_the_subnet_selection_searched():
    method = get_method("glora")
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    select = method.resolve_settings({"ranks": [2], "search_population": 6, "search_generations": 2,
                                      "search_parents": 3, "search_mutations": 3, "search_crossovers": 3})
    ctx = MethodContext(seed=3, validate=lambda m: -float(nn.functional.cross_entropy(m(x), y)))
    model = method.finalize(method.wrap(Tiny(), SITE, select, ctx), SITE, select, ctx)
    searched = method.describe(model)["subnet"]
    assert set(searched) == {"l1", "l2"} and "sampled" not in searched.values()
    # two selection seeds under the same settings: the final stage takes the subnet of the better one
    records = [{"status": "ok", "method": "glora", "task": "t", "seed": s, "settings": json.dumps(select),
                "top1": score, "extra": json.dumps({"method": {"subnet": sub}})}
               for s, score, sub in [(0, 0.5, {k: "A=none,B=none,C=none,D=none,E=scalar" for k in searched}),
                                     (1, 0.7, searched)]]
    final = choose_settings(records, "top1")[("glora", "t")]
    assert final["subnet"] == searched and final["ranks"] == [2]
    final = method.resolve_settings(final)
    assert not method.needs_selection(final)

    def no_scoring(_m):
        raise AssertionError("the final stage scored a candidate subnet")

    # the final trial: the fixed subnet from the start, no sampling, no search (it never calls evaluate)
    ctx = MethodContext(seed=0, validate=no_scoring)
    model = method.wrap(Tiny(), SITE, final, ctx)
    model.train()
    out1, out2 = model(x), model(x)
    assert torch.equal(out1, out2)  # nothing sampled per forward
    model = method.finalize(model, SITE, final, ctx)
    assert method.describe(model)["subnet"] == searched  # recorded in the final record too


def test_a_per_layer_subnet_must_cover_the_adapted_layers():
    method = get_method("glora")
    bad = method.resolve_settings({"ranks": [2], "subnet": {"l1": "A=lora2,B=none,C=none,D=none,E=none"}})
    with pytest.raises(ConfigError, match=r"missing \['l2'\]"):
        method.check_fit(Tiny(), SITE, bad)
    worse = method.resolve_settings({"ranks": [2], "subnet": {"l1": "A=lora8,B=none,C=none,D=none,E=none",
                                                              "l2": "A=none,B=none,C=none,D=none,E=none"}})
    with pytest.raises(ConfigError, match="valid forms of A"):
        method.check_fit(Tiny(), SITE, worse)


# --- finding 3: GLoRA's budgets -------------------------------------------------------------------------

def test_glora_budget_is_checked_before_compute_and_respected_by_the_search():
    method = get_method("glora")
    # impossible: above the largest subnet; below: every subnet of these layers fits
    with pytest.raises(ConfigError, match="no subnet fits the parameter budget"):
        method.check_fit(Tiny(), SITE, method.resolve_settings({"ranks": [2], "param_budget_min": 10_000}))
    with pytest.raises(ConfigError, match="param_budget_min=.* is above param_budget_max"):
        method.check_fit(Tiny(), SITE, method.resolve_settings({"param_budget_min": 50, "param_budget_max": 10}))
    # possible but tight: every scored candidate is inside it, and the chosen subnet counts inside it
    settings = method.resolve_settings({"ranks": [2], "param_budget_max": 60, "search_population": 8,
                                        "search_generations": 2})
    method.check_fit(Tiny(), SITE, settings)
    ctx = MethodContext(seed=1, validate=lambda m: random.Random(str(method.describe(m))).random())
    model = method.finalize(method.wrap(Tiny(), SITE, settings, ctx), SITE, settings, ctx)
    own, _head = method.count(model, SITE)
    found = method.describe(model)["search"]
    assert own <= 60 and found["best_params"] == own and found["rejected_budget"] > 0


def _vit_b16_linears() -> list[tuple[str, int, int]]:
    """ViT-B/16's Linears in its 12 blocks (qkv, attn.proj, fc1, fc2): what GLoRA adapts on VTAB-1K."""
    per_block = [("attn.qkv", 768, 2304), ("attn.proj", 768, 768), ("mlp.fc1", 768, 3072), ("mlp.fc2", 3072, 768)]
    return [(f"blocks.{i}.{n}", din, dout) for i in range(12) for n, din, dout in per_block]


def test_vtab1k_sweep_has_the_papers_three_glora_budgets():
    raw = yaml.safe_load((ROOT / "sweeps" / "vtab1k.yaml").read_text())
    studies = {s["name"]: s for s in raw["studies"]}
    glora = [s for s in studies.values() if any(m.split("@")[0] == "glora" for m in s["methods"])]
    assert len(glora) == 1, "one GLoRA study"
    study = glora[0]
    assert study["budget"]["epochs"] == 500  # the paper's supernet epochs
    assert study["protocol"] == "select-then-final"
    rows = study["methods"]
    assert sorted(rows) == ["glora@0.29M", "glora@0.44M", "glora@0.86M"]
    expected = {"glora@0.29M": ([2], 290_000), "glora@0.44M": ([4, 2], 440_000), "glora@0.86M": ([8, 4], 860_000)}
    for name, (ranks, budget) in expected.items():
        settings = get_method(name).resolve_settings({k: v for k, v in rows[name].items() if k != "lr"})
        assert settings["ranks"] == ranks and settings["param_budget_max"] == budget
        # each budget is one a search can work with on ViT-B/16 (raises otherwise)
        check_budget(_vit_b16_linears(), ranks, settings["param_budget_min"], budget, settings["search_population"])
    # the three rows share the main study's leaderboard, beside the other methods
    assert all(s.get("leaderboard", "vtab1k") == "vtab1k" for s in studies.values())


# --- finding 5: RL selection and row labels ------------------------------------------------------------

def test_rl_selection_episodes_never_share_start_states_with_reported_ones():
    from agents.track import SELECTION_EPISODES, episode_seed

    def env_seeds(eval_seed: int, n: int = 50) -> set[int]:  # as agents.rollout.RolloutPool derives them
        return {10_007 * eval_seed + 1_000_003 + i for i in range(n)}

    final = set().union(*(env_seeds(episode_seed(s, "final")) for s in range(10)))
    select = set().union(*(env_seeds(episode_seed(s, "select")) for s in range(10)))
    assert not final & select
    assert episode_seed(2, "final") == 2 and episode_seed(2, "select") == SELECTION_EPISODES + 2
    assert max(env_seeds(episode_seed(10, "select"))) < 2**32  # a valid env seed


def _study(**kw) -> Study:
    doc = {"name": "s", "track": "rl", "benchmark": "cw10", "tasks": ["hammer", "push"], "protocol": "select-then-final",
           "methods": {"full": {"lr": 1e-3}, "lora": {"r": [2, 4]}, "eigenlora": {"k": 2},
                       "glora": {"ranks": [2]}}}
    doc.update(kw)
    return Study.model_validate(doc)


def test_selection_stage_runs_only_where_something_is_chosen_and_rows_say_how():
    study = _study()
    # lora: two grid points; glora: its subnet search; eigenlora: its bank comes from lora's same stage
    assert selection_methods(study) == ["lora", "glora"]
    assert selection_methods(_study(methods={"full": {}, "lora": {"r": [2, 4]}, "eigenlora": {"k": [1, 2]}})) == [
        "lora", "eigenlora"]
    recs = label_records([{"method": m} for m in study.methods], study, selection_methods(study))
    by = {r["method"]: (r["selection"], r["grid_size"]) for r in recs}
    assert by == {"full": ("single-point", 1), "lora": ("held-out", 2), "eigenlora": ("single-point", 1),
                  "glora": ("held-out", 1)}
    grid = _study(protocol="best-on-reported")
    recs = label_records([{"method": m} for m in grid.methods], grid, selection_methods(grid))
    assert {r["method"]: r["selection"] for r in recs}["lora"] == "on-reported"
    assert selection_methods(grid) == []


def test_cw10_sweep_selects_on_held_out_episodes_by_default():
    raw = yaml.safe_load((ROOT / "sweeps" / "cw10.yaml").read_text())
    assert raw["protocol"] == "select-then-final" and raw["selection"]["seeds"]
    study = load_sweep(ROOT / "sweeps" / "cw10.yaml").studies[0]
    # the LoRA family's grids are chosen on held-out episodes; single-point methods skip selection
    assert {"lora", "dora", "eva", "glora"} <= set(selection_methods(study))
    assert "full" not in selection_methods(study)


def test_leaderboard_rows_carry_selection_and_grid_size():
    from harness.leaderboard import aggregate

    base = {"status": "ok", "task": "t", "backbone": "b", "benchmark": "cw10", "trainable_params": 1, "head_params": 0,
            "peak_memory_mb": 0.0, "wall_time_s": 1.0, "data_source": "real", "date": "2025-01-01"}
    recs = [dict(base, method="lora", settings='{"r": 2}', seed=0, success=0.5, selection="on-reported", grid_size=2),
            dict(base, method="lora", settings='{"r": 4}', seed=0, success=0.7, selection="on-reported", grid_size=2)]
    row = aggregate(recs, "success", {}).iloc[0]
    assert row["selection"] == "on-reported" and row["grid_size"] == 2 and row["settings"] == '{"r": 4}'
    assert "grid_size_mean" not in aggregate(recs, "success", {}).columns  # bookkeeping, not a metric


# --- finding 6: EigenLoRA's bank ------------------------------------------------------------------------

def test_bank_is_one_lora_adapter_per_other_task_by_the_stated_rule():
    def rec(task, r, seed, score, method="lora"):
        return {"status": "ok", "method": method, "task": task, "seed": seed, "settings": json.dumps({"r": r}),
                "success": score, "adapter_path": f"/cache/{method}-{task}-r{r}-s{seed}"}

    records = [rec("hammer", 2, 0, 0.9), rec("hammer", 2, 1, 0.9), rec("push", 2, 0, 0.2), rec("push", 2, 1, 0.2),
               rec("push", 4, 1, 0.8), rec("push", 4, 2, 0.6), rec("faucet-close", 2, 0, 0.1, method="full"),
               {**rec("shelf-place", 2, 0, 0.0), "status": "failed"}]
    bank = lora_bank(records, "hammer", ("lora",), "success")
    assert bank == ["/cache/lora-push-r4-s1"]  # push's chosen r=4, its lowest seed; hammer itself left out
    assert lora_bank(records, "push", ("lora",), "success") == ["/cache/lora-hammer-r2-s0"]


def test_a_study_without_lora_needs_a_bank_folder(tmp_path):
    def sweep(methods):
        return SweepFile.model_validate({"name": "x", "studies": [{"name": "s", "track": "rl", "benchmark": "cw10",
                                                                   "methods": methods}]})

    with pytest.raises(ConfigError, match="builds its bank from the study's own lora trials"):
        check_banks(sweep({"full": {}, "eigenlora": {}}))
    check_banks(sweep({"lora@r2": {"r": 2}, "eigenlora": {}}))
    check_banks(sweep({"eigenlora": {"bank_dir": str(tmp_path)}}))


def test_method_variant_labels_are_checked():
    assert get_method("glora@0.29M") is get_method("glora")
    with pytest.raises(ConfigError, match="variant label"):
        get_method("glora@a/b")
    with pytest.raises(ConfigError, match="unknown method|valid"):
        get_method("nope@x")


# --- end to end through Ray Tune: held-out RL selection, the default bank and a bank_dir with '/' -------

def pf_study(tmp_path: Path, tiny: dict) -> dict:
    """The study of the end-to-end test below, with its folder of two LoRA adapters (a bank_dir holding '/'
    and a space): lora over a grid of two ranks (selected on held-out episodes), EigenLoRA with the default
    bank (the study's own LoRA adapters of the other task) and with that folder. tests/conftest.py runs it
    in the shared tiny sweep, beside the study the other end-to-end tests look at."""
    from safetensors.torch import save_file

    from harness.tracks import get_track

    track = get_track("rl")
    model, site = track.shape_model(track.settings(tiny), "cw10")
    bank = tmp_path / "a bank" / "of/adapters"  # '/' and a space: the trial folder names must cope
    bank.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        save_file({f"base_model.model.{n}.lora_{side}.weight": torch.randn(*shape, generator=g)
                   for n, m in site.target_linears(model)
                   for side, shape in (("A", (2, m.in_features)), ("B", (m.out_features, 2)))},
                  str(bank / f"t{i}.safetensors"))
    return {"name": "pf", "track": "rl", "benchmark": "cw10", "tasks": ["window-close", "faucet-close"],
            "protocol": "select-then-final", "selection": {"seeds": [0]}, "seeds": [0],
            "methods": {"lora": {"r": [2, 4], "lr": 1e-3}, "eigenlora": {"k": 1, "r": 1},
                        "eigenlora@dir": {"k": 1, "r": 1, "bank_dir": str(bank)}},
            "budget": {"steps": 4, "eval_episodes": 1, "batch_size": 8, "report_every": 2}, "settings": tiny,
            "leaderboard": "pf", "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}}


def test_sweep_selects_held_out_and_builds_banks_by_the_rule(tiny_rl_sweep):
    """The study ``pf`` (:func:`pf_study`) of the shared tiny sweep (tests/conftest.py)."""
    sweep = tiny_rl_sweep
    res, board = sweep.results, sweep.board
    assert (res / "tiny" / "pf-records.jsonl").is_file(), sweep.output[-4000:]

    def load(name):
        return [json.loads(line) for line in (res / "tiny" / name).read_text().splitlines()]

    select, final = load("pf-select-records.jsonl"), load("pf-records.jsonl")
    # only lora has a grid to choose from; its selection rollouts have start states of their own
    assert {r["method"] for r in select} == {"lora"} and len(select) == 4
    assert all(json.loads(r["extra"])["eval_seed"] == 100_000 for r in select)
    assert all(json.loads(r["extra"])["eval_seed"] == 0 for r in final if r["status"] == "ok")
    assert len(final) == 6 and all(r["status"] == "ok" for r in final), [r.get("error") for r in final]
    labels = {r["method"]: (r["selection"], r["grid_size"]) for r in final}
    assert labels == {"lora": ("held-out", 2), "eigenlora": ("single-point", 1), "eigenlora@dir": ("single-point", 1)}
    lora = {r["task"]: r for r in final if r["method"] == "lora"}
    for r in final:
        info = json.loads(r["extra"])["method"]
        if r["method"] == "eigenlora":  # the other task's final LoRA adapter, and only it
            other = next(t for t in lora if t != r["task"])
            assert [b["path"] for b in info["bank"]] == [lora[other]["adapter_path"]]
            assert info["bank"][0]["task"] == other and info["bank_from"] == "trials"
        elif r["method"] == "eigenlora@dir":
            assert sorted(Path(b["path"]).name for b in info["bank"]) == ["t0.safetensors", "t1.safetensors"]
    table = pd.read_csv(board / "pf.csv").set_index(["method", "task"])
    assert set(table["selection"]) == {"held-out", "single-point"}
    assert table.loc[("lora", "faucet-close"), "grid_size"] == 2

"""Trials that share a process (issue 20, item 4): Tune's actor reuse runs a wave's trials one after another
in one process, and each record is the one a trial in a process of its own gives (measurements apart);
what the process keeps (the base's weights) is never changed by a trial, and what it must not keep
(dynamo's compiled frames) is dropped between trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness import process_cache
from harness.errors import ConfigError
from harness.process_cache import INDUCTOR_ENV, REUSE_ENV
from harness.trial import MEASUREMENT_FIELDS
from tests.test_sweep_e2e import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_the_reuse_switch_reads_its_environment_variable():
    assert process_cache.reuse_actors({}) is True  # on unless said otherwise
    assert process_cache.reuse_actors({REUSE_ENV: "0"}) is False
    assert process_cache.reuse_actors({REUSE_ENV: "Yes"}) is True
    with pytest.raises(ConfigError, match=f"{REUSE_ENV}='sometimes'.*expected one of 1, true"):
        process_cache.reuse_actors({REUSE_ENV: "sometimes"})


def test_the_base_is_read_once_and_no_trial_changes_it(tmp_path, monkeypatch):
    path = tmp_path / "base.pt"
    torch.save({"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, path)
    monkeypatch.setattr(process_cache, "_states", {})
    first = process_cache.base_state(path)
    assert process_cache.base_state(path) is first  # the same tensors: not read again
    model = torch.nn.Linear(2, 3)
    model.load_state_dict(first)
    with torch.no_grad():
        model.weight.add_(5.0)  # a trial trains its copy
    assert torch.equal(process_cache.base_state(path)["weight"], torch.ones(3, 2))  # the next one starts clean
    torch.save({"weight": torch.full((3, 2), 2.0), "bias": torch.zeros(3)}, path)
    os.utime(path, ns=(1, 1))  # another version of the file (another modification time): read again
    assert torch.equal(process_cache.base_state(path)["weight"], torch.full((3, 2), 2.0))
    assert len(process_cache._states) == 1  # the old version is not kept beside it


def test_a_later_trial_of_a_process_compiles_afresh(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(process_cache, "_trials_begun", 0)
    assert process_cache.begin_trial() == 0
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend="eager")  # dynamo alone: no C++ compiler needed
    x = torch.ones(4)
    counters.clear()
    fn(x)
    fn(x)
    assert counters["stats"]["unique_graphs"] == 1  # the second call used the compiled frame
    assert process_cache.begin_trial() == 1  # the next trial of this process ...
    fn(x)
    assert counters["stats"]["unique_graphs"] == 2  # ... traces again, as a fresh process would


def test_the_compile_cache_goes_under_the_harness_cache_unless_set(tmp_path, monkeypatch):
    monkeypatch.delenv(INDUCTOR_ENV, raising=False)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()  # as importing peft does: torch writes its own default into the variable
    assert os.environ.get(INDUCTOR_ENV)  # torch's default, not the user's choice
    folder = process_cache.use_shared_compile_cache(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "compile" / "inductor" and folder.is_dir()
    assert os.environ[INDUCTOR_ENV] == str(folder)
    assert cache_dir() == str(folder)  # where inductor will look
    monkeypatch.setenv(INDUCTOR_ENV, str(tmp_path / "mine"))
    assert process_cache.use_shared_compile_cache(tmp_path / "cache") == tmp_path / "mine"  # the user's wins


def run_sweep(tmp_path: Path, name: str, reuse: bool) -> list[dict]:
    # dropout on, so that the trials' random streams matter; three methods in one process, one after another
    doc = {"name": name, "track": "rl", "benchmark": "cw10", "tasks": ["window-close"],
           "methods": {"full": {"lr": 1.0e-3}, "lora": {"r": 2, "lr": 1.0e-3}, "adalora": {"r": 2, "lr": 1.0e-3}},
           "seeds": [0], "budget": {"steps": 8, "eval_episodes": 1, "batch_size": 8, "report_every": 4},
           "settings": {**TINY, "dropout": 0.1, "deterministic": True}, "leaderboard": name,
           "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache"), REUSE_ENV: "1" if reuse else "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "harness", "sweep", str(path), "--results", str(tmp_path / name),
                           "--leaderboard", str(tmp_path / f"{name}-board"), "--no-dashboard", "--cpus", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    lines = (tmp_path / name / name / f"{name}-records.jsonl").read_text().splitlines()
    return sorted((json.loads(x) for x in lines), key=lambda r: r["method"])


@pytest.mark.slow
def test_trials_in_one_process_give_the_records_of_trials_in_their_own(tmp_path):
    shared = run_sweep(tmp_path, "shared", reuse=True)
    apart = run_sweep(tmp_path, "apart", reuse=False)
    assert len(shared) == len(apart) == 3 and all(r["status"] == "ok" for r in shared + apart)
    extras = {n: [json.loads(r["extra"]) for r in recs] for n, recs in (("shared", shared), ("apart", apart))}
    # one 1-CPU slot: with reuse the three trials ran in one process, without it each in its own
    assert sorted(e["process_trials_before"] for e in extras["shared"]) == [0, 1, 2]
    assert len({e["timing"]["process_started_at"] for e in extras["shared"]}) == 1
    assert [e["process_trials_before"] for e in extras["apart"]] == [0, 0, 0]
    assert len({e["timing"]["process_started_at"] for e in extras["apart"]}) == 3
    skip = {*MEASUREMENT_FIELDS, "extra", "adapter_path"}
    for a, b, ea, eb in zip(shared, apart, extras["shared"], extras["apart"]):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}, a["method"]
        assert ea["returns"] == eb["returns"]

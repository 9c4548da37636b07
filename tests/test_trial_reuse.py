"""Trials that share a process (issue 20, item 4): Tune's actor reuse runs a wave's trials one after another
in one process, and each record is the one a trial in a process of its own gives (measurements apart);
what the process keeps (the base's weights) is never changed by a trial, and what it must not share
(a compiled dynamo frame) is each trainer's own. That a wave's trials sharing a process give the records
of trials run alone is checked end to end in tests/test_trial_checkpoint.py, on the sweep it runs anyway."""

from __future__ import annotations

import os

import pytest
import torch

from harness import process_cache
from harness.errors import ConfigError
from harness.process_cache import INDUCTOR_ENV, REUSE_ENV

def test_the_reuse_switch_reads_its_environment_variable():
    assert process_cache.reuse_actors({}) is True  # on unless said otherwise
    assert process_cache.reuse_actors({}, on_gpu=True) is True  # GPU trials too, since begin_trial resets no dynamo
    assert process_cache.reuse_actors({REUSE_ENV: "0"}, on_gpu=True) is False  # the variable wins
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


def test_each_trainer_compiles_a_frame_of_its_own_without_resetting_dynamo(monkeypatch):
    """Trials that follow each other in one process (a reused actor) each trace their own graph, as a fresh
    process would, with no recompile of anyone's frame and none running eager past the recompile limit, and
    dynamo's global state is never reset between them (``harness.training.own_frame``, ``begin_trial``)."""
    from torch._dynamo.utils import counters

    from harness.training import own_frame

    monkeypatch.setattr(process_cache, "_trials_begun", 0)
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    limit = torch._dynamo.config.recompile_limit
    counters.clear()
    x = torch.ones(4)
    for trial in range(limit + 4):  # more trials than one frame may hold graphs
        assert process_cache.begin_trial() == trial

        def loss(batch, k=trial + 1):  # a trainer's bound loss: the same code for every trial
            return (torch.sin(batch) * k).sum()

        step = torch.compile(own_frame(loss, f"trainer_loss_{trial}"), backend="eager")  # dynamo alone
        assert float(step(x)) == pytest.approx(float(loss(x)))
        step(x)  # the second call of a trial runs its frame's graph
    assert counters["stats"]["unique_graphs"] == limit + 4  # one graph per trial, none shared or dropped
    assert not counters["recompiles"] and not resets


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

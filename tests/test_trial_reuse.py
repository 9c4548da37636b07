"""Trials that share a process (issue 20, item 4): Tune's actor reuse runs a wave's trials one after another
in one process, and each record is the one a trial in a process of its own gives (measurements apart);
what the process keeps (the base's weights) is never changed by a trial, and what it must not share
(a compiled dynamo frame) is each trainer's own. That a wave's trials sharing a process give the records
of trials run alone is checked end to end in tests/test_trial_checkpoint.py, on the sweep it runs anyway."""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

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


def test_trials_replaying_cuda_graphs_reuse_processes_too_unless_told_not_to(capsys):
    """Reused processes of reduce-overhead GPU trials crashed on an H200 while each trial had a thread of its
    own; with one trial thread per process the same trials ran clean (BENCHMARKS.md, "Reused processes under
    CUDA graphs"), so the switch no longer depends on the compile mode, and says nothing."""
    assert process_cache.reuse_actors({}, on_gpu=True) is True
    assert process_cache.reuse_actors({REUSE_ENV: "off"}, on_gpu=True) is False
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(TypeError):
        process_cache.reuse_actors({}, on_gpu=True, cuda_graphs=True)  # the old exception is gone, not ignored


def test_every_trial_of_a_process_runs_on_one_thread_that_survives_a_stopped_trial():
    """Tune starts each trial in a new thread; the trial body runs on the process's one trial thread, whose
    result or exception (Ray stops a reporting trial with SystemExit) comes back to the caller."""
    def where(x):
        return threading.get_ident(), threading.current_thread().name, x

    outer = []
    for i in range(2):  # as Tune does: each trial from a thread of its own
        t = threading.Thread(target=lambda i=i: outer.append(process_cache.on_trial_thread(where, i)))
        t.start()
        t.join()
    (ident1, name1, x1), (ident2, name2, x2) = outer
    assert ident1 == ident2 and name1.startswith("harness-trial") and (x1, x2) == (0, 1)
    assert ident1 != threading.get_ident()

    def stopped():
        sys.exit(0)

    with pytest.raises(SystemExit):
        process_cache.on_trial_thread(stopped)
    with pytest.raises(ValueError, match="bad trial"):
        process_cache.on_trial_thread(lambda: (_ for _ in ()).throw(ValueError("bad trial")))
    assert process_cache.on_trial_thread(where, 3)[0] == ident1  # the same thread after both


def test_a_later_trial_clears_the_previous_trials_cuda_graph_trees_on_its_thread(monkeypatch):
    """begin_trial resets torch's CUDA graph trees (thread-local, so on the trial thread) from the second
    trial of a process on; the first has none to clear."""
    import torch._inductor.cudagraph_trees as trees

    calls = []
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: calls.append(threading.get_ident()))
    monkeypatch.setattr(process_cache, "_trials_begun", 0)
    monkeypatch.setattr(process_cache, "_graph_steps", {})  # no shared loss is bound to the trees
    first = process_cache.on_trial_thread(process_cache.begin_trial)
    assert first == 0 and calls == []
    assert process_cache.on_trial_thread(process_cache.begin_trial) == 1
    assert len(calls) == 1 and calls[0] == process_cache.on_trial_thread(threading.get_ident)


def test_the_share_switch_is_on_unless_turned_off_and_a_bad_value_stops_a_sweep_before_ray(tmp_path, monkeypatch,
                                                                                            capsys):
    from harness.process_cache import SHARE_ENV

    assert process_cache.share_compiled({}) is True and process_cache.share_compiled({SHARE_ENV: "off"}) is False
    assert process_cache.share_compiled({SHARE_ENV: "on"}) is True
    _assert_refused_before_ray(SHARE_ENV, "maybe", tmp_path, monkeypatch, capsys)


def _assert_refused_before_ray(variable: str, value: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """The quickstart sweep with ``variable=value`` (read where the trials run) exits non-zero, naming it,
    before Ray starts."""
    from harness.cli import main

    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    started = []
    monkeypatch.setattr("harness.driver.init_ray", lambda *a, **k: started.append(1))
    root = Path(__file__).resolve().parents[1]
    code = main(["sweep", str(root / "sweeps" / "quickstart.yaml"), "--results", str(tmp_path / "results"),
                 "--leaderboard", str(tmp_path / "board")])
    assert code != 0 and not started
    assert f"{variable}={value!r}" in capsys.readouterr().err


def test_the_graph_share_switch_is_on_unless_either_variable_turns_it_off_and_a_bad_value_stops_a_sweep(
        tmp_path, monkeypatch, capsys):
    from harness.process_cache import SHARE_ENV, SHARE_GRAPHS_ENV

    assert process_cache.share_graphs({}) is True
    assert process_cache.share_graphs({SHARE_GRAPHS_ENV: "0"}) is False
    assert process_cache.share_graphs({SHARE_ENV: "off"}) is False  # no sharing at all
    assert process_cache.share_graphs({SHARE_ENV: "off", SHARE_GRAPHS_ENV: "on"}) is False
    with pytest.raises(ConfigError, match=f"{SHARE_GRAPHS_ENV}='later'.*expected one of 1, true"):
        process_cache.share_graphs({SHARE_GRAPHS_ENV: "later"})
    _assert_refused_before_ray(SHARE_GRAPHS_ENV, "later", tmp_path, monkeypatch, capsys)


def test_the_affinity_switch_is_on_unless_turned_off_and_a_bad_value_stops_a_sweep_before_ray(tmp_path, monkeypatch,
                                                                                               capsys):
    from harness.process_cache import AFFINITY_ENV

    assert process_cache.route_by_structure({}) is True
    assert process_cache.route_by_structure({AFFINITY_ENV: "off"}) is False
    with pytest.raises(ConfigError, match=f"{AFFINITY_ENV}='sometimes'.*expected one of 1, true"):
        process_cache.route_by_structure({AFFINITY_ENV: "sometimes"})
    _assert_refused_before_ray(AFFINITY_ENV, "sometimes", tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("share", ["1", "0"])
def test_graph_trees_a_shared_loss_is_bound_to_are_kept_for_a_bounded_number_of_trials(monkeypatch, share):
    """Under CUDA graphs a shared compiled loss is bound to the thread's graph trees: begin_trial keeps them
    (and the loss) while one is bound, for GRAPH_TREE_TRIALS trials, then resets them and drops the losses
    bound to them, so the next trial compiles afresh; steps of the default mode stay. With the switch off
    the trees are reset at every trial, as before."""
    import torch._inductor.cudagraph_trees as trees

    from harness.process_cache import SHARE_GRAPHS_ENV

    resets = []
    monkeypatch.setenv(SHARE_GRAPHS_ENV, share)
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: resets.append(1))
    monkeypatch.setattr(process_cache, "_trials_begun", 0)
    monkeypatch.setattr(process_cache, "_trials_on_trees", 0)
    monkeypatch.setattr(process_cache, "_trees_trusted", True)
    monkeypatch.setattr(process_cache, "_graph_steps", {})
    monkeypatch.setattr(process_cache, "_steps", {})
    monkeypatch.setattr(process_cache, "GRAPH_TREE_TRIALS", 3)
    built, per_trial = [], []
    for trial in range(7):
        process_cache.begin_trial()
        graphs = process_cache.shared_step(("loss", "graphs"), lambda: built.append(trial) or object(), graphs=True)
        default = process_cache.shared_step(("loss", "default"), object)
        per_trial.append((len(resets), graphs, default))
    assert all(default is per_trial[0][2] for _, _, default in per_trial)  # the default mode's is kept
    if share == "1":
        assert built == [0, 3, 6] and [n for n, _, _ in per_trial] == [0, 0, 0, 1, 1, 1, 2]
        assert per_trial[1][1] is per_trial[0][1] and per_trial[3][1] is not per_trial[2][1]
    else:
        assert built == list(range(7)) and [n for n, _, _ in per_trial] == list(range(7))


def test_a_failed_trial_has_the_graph_trees_reset_before_the_next(monkeypatch):
    """A trial that failed may have left the graph trees mid-recording: the next trial starts on fresh trees
    and compiles afresh, even under the GRAPH_TREE_TRIALS bound; a stopped or finished one keeps them."""
    import torch._inductor.cudagraph_trees as trees

    resets = []
    monkeypatch.delenv(process_cache.SHARE_GRAPHS_ENV, raising=False)
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: resets.append(1))
    for name, value in (("_trials_begun", 0), ("_trials_on_trees", 0), ("_graph_steps", {}), ("_trees_trusted", True)):
        monkeypatch.setattr(process_cache, name, value)
    built = []
    for ok in (True, True, False, True, True):
        process_cache.begin_trial()
        process_cache.shared_step(("loss",), lambda: built.append(len(resets)) or object(), graphs=True)
        process_cache.end_trial(ok)
    assert resets == [1] and built == [0, 1]  # reset once, after the failed third trial; rebuilt after it


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


def test_trainers_of_one_structure_share_a_compiled_loss_and_train_as_with_their_own(monkeypatch):
    """Sharing (on unless HARNESS_SHARE_COMPILED=0; issue 20, item 4): a reused actor's next trainer of the same structure runs the
    compiled loss the last one traced, with no new frame, and trains to the same bits as with a frame of its own;
    a trainer whose call the shared graph's guards refuse (another batch size) compiles its own instead, as
    without sharing; the shared frame keeps no trainer's model alive. On the CPU, with AOT autograd and eager
    kernels standing in for inductor (the graph, not the kernels, is what sharing decides)."""
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model
    from torch._dynamo.testing import CompileCounterWithBackend

    from agents.bench import random_episodes
    from agents.data import WindowSampler
    from agents.dt import DTConfig, DecisionTransformer, batch_loss
    from harness import training
    from harness.process_cache import SHARE_ENV

    monkeypatch.setattr(training, "COMPILED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(process_cache, "_steps", {})
    cfg = DTConfig(n_layer=1, n_head=2, n_embd=32, context=4, dropout=0.1)
    sampler = WindowSampler(random_episodes(8, cfg), cfg.context, seed=0, device=torch.device("cpu"))
    batches = {n: [sampler.sample(n) for _ in range(3)] for n in (4, 6)}

    def train(seed: int, batch_size: int) -> tuple[training.Trainer, list[float], nn.Module]:
        torch.manual_seed(seed)
        model = get_peft_model(DecisionTransformer(cfg), LoraConfig(r=2, target_modules=["qkv", "fc1"]))
        feed = iter(batches[batch_size])
        loop = training.LoopConfig(steps=3, lr=1e-2, compile=True, report_every=1)
        trainer = training.Trainer(model, batch_loss, lambda: next(feed), loop, torch.device("cpu"))
        while trainer.step():
            pass
        return trainer, [loss for _, loss in trainer.finish().losses], model

    runs = {}
    for share in ("0", "1"):
        monkeypatch.setenv(SHARE_ENV, share)
        counter = CompileCounterWithBackend("aot_eager")
        monkeypatch.setattr(training, "COMPILE_BACKEND", counter)
        frames, steps, results, models = [], [], [], []
        for seed, batch_size in ((0, 4), (1, 4), (2, 6)):  # two of one structure and batch, then another batch
            trainer, losses, model = train(seed, batch_size)
            frames.append(counter.frame_count)
            steps.append(trainer.compiled_step)
            results.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
            models.append(weakref.ref(model))
        runs[share] = frames, steps, results
        del trainer, model
        gc.collect()
        assert all(ref() is None for ref in models)  # no frame, shared or not, holds a trainer's model
    assert runs["0"][0] == [1, 2, 3] and runs["0"][1] == ["own"] * 3
    assert runs["1"][0] == [1, 1, 2]  # the second trainer compiled nothing; the third its own frame
    assert runs["1"][1] == ["shared", "shared", "own after shared"]
    for (losses, state), (losses_own, state_own) in zip(runs["1"][2], runs["0"][2]):
        assert losses == losses_own and all(torch.equal(state[k], state_own[k]) for k in state)
    assert runs["1"][2][0][0] != runs["1"][2][1][0]  # the trainers did differ (the comparison can fail)


def test_trainers_under_cuda_graphs_share_a_loss_of_their_mode_only(monkeypatch):
    """A reduce-overhead trainer shares the loss the last one of its structure and mode compiled (the graph
    is the same; the CUDA graphs are recorded per trainer on a GPU), never a default-mode trainer's, and
    compiles its own with HARNESS_SHARE_GRAPHS=0. On the CPU, with dynamo's counting backend standing in."""
    from torch._dynamo.testing import CompileCounter

    from harness import training
    from harness.process_cache import SHARE_GRAPHS_ENV

    monkeypatch.setattr(training, "COMPILED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(process_cache, "_steps", {})
    monkeypatch.setattr(process_cache, "_graph_steps", {})
    counter = CompileCounter()
    monkeypatch.setattr(training, "COMPILE_BACKEND", counter)
    batch = (torch.randn(6, 4), torch.randn(6, 2))

    def train(mode: str) -> tuple[str, int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        loop = training.LoopConfig(steps=2, lr=1e-2, compile=True, compile_mode=mode, report_every=1)
        trainer = training.Trainer(model, _mse, lambda: batch, loop, torch.device("cpu"))
        while trainer.step():
            pass
        trainer.finish()
        return trainer.compiled_step, counter.frame_count

    assert [train("reduce-overhead"), train("reduce-overhead")] == [("shared", 1), ("shared", 1)]
    assert train("default") == ("shared", 2)  # the same structure in another mode: a loss of its own kind
    assert len(process_cache._graph_steps) == 1 and len(process_cache._steps) == 1
    monkeypatch.setenv(SHARE_GRAPHS_ENV, "0")
    assert train("reduce-overhead") == ("own", 3)


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


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


def test_a_trials_memory_columns_leave_out_what_earlier_trials_of_its_process_left(cache, monkeypatch):
    """A reused GPU process can hold memory of earlier trials when the next begins (the CUDA graphs a shared
    compiled loss keeps: ~50 MiB per earlier trial for the paper DT on an H200), which the allocator's peak
    counts; a trial's memory columns leave it out, and ``extra`` says how much there was. The allocator's
    readings stand in for a GPU's (the CPU has none); the trial is a real one."""
    from harness import finetune
    from harness.trial import TrialSpec

    readings = {"allocated": 100.0, "reserved_now": 128.0, "peak": 2400.0, "reserved": 2600.0}
    monkeypatch.setattr(finetune, "_memory_mb", lambda kind, device=None: readings[kind])
    vision = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 1},
              "weights": "random", "threads": 1}
    spec = TrialSpec("vision", "builtin", "shapes", "lora", {"r": 2}, 0, {"steps": 2, "batch_size": 8}, vision)
    record = finetune.run_trial(spec, lambda m: None)
    assert record.status == "ok", record.error
    assert record.peak_memory_mb == 2300.0 and record.train_peak_memory_mb == 2300.0
    assert record.train_reserved_memory_mb == 2472.0
    assert record.extra["memory_left_by_earlier_trials_mb"] == {"allocated": 100.0, "reserved": 128.0}
    readings.update(allocated=0.0, reserved_now=0.0)  # a fresh process: nothing left, nothing said
    fresh = finetune.run_trial(spec, lambda m: None)
    assert fresh.peak_memory_mb == 2400.0 and "memory_left_by_earlier_trials_mb" not in fresh.extra

"""RL track: rollouts, and tiny end-to-end trials through the RL track and the engine (real Meta-World, real training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import ConfigError
from harness.tracks import get_track

track = get_track("rl")

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "data_episodes": 2,
        "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 20, "pretrain_batch_size": 16,
        "pretrain_eval_episodes": 0, "eval_workers": 2, "data_workers": 1, "device": "cpu", "compile": False}


def test_rollout_two_envs_tiny_dt():
    from agents.dt import DTConfig, DecisionTransformer
    from agents.rollout import evaluate_dt, evaluate_scripted

    m = DecisionTransformer(DTConfig(n_layer=1, n_head=2, n_embd=32, context=4, dropout=0.0))
    r = evaluate_dt(m, "reach", episodes=2, target_return=1500.0, workers=2, seed=0)
    assert r.episodes == 2 and len(r.returns) == 2 and r.wall_s > 0
    assert 0.0 <= r.success <= r.success_any <= 1.0 and r.return_mean > 0
    assert r.env_steps_per_s > 0
    s = evaluate_scripted("reach", episodes=2, workers=1, seed=0)
    assert s.success_any == 1.0 and s.return_mean > r.return_mean


def test_rollout_pool_cleans_up_on_error():
    from agents.rollout import RolloutPool

    with pytest.raises(RuntimeError):
        with RolloutPool("reach", 2, 2) as pool:
            procs = list(pool.procs)
            pool.reset()
            raise RuntimeError("boom")
    assert procs and not any(p.is_alive() for p in procs)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="n_embd"):
        track.settings({"n_embed": 64})
    with pytest.raises(ConfigError, match="window-close"):
        track.settings({"pretrain_tasks": ["window-clos"]})
    with pytest.raises(ConfigError, match="n_layer'='two': expected an integer"):
        track.settings({"n_layer": "two"})
    with pytest.raises(ConfigError, match="n_layer'=True: expected an integer"):
        track.settings({"n_layer": True})
    with pytest.raises(ConfigError, match="device'='gpu'.*auto, cpu, cuda or cuda:N"):
        track.settings({"device": "gpu"})
    assert track.settings({"lr": "1e-4"}).lr == 1e-4  # YAML reads 1e-4 as a string; it is a number
    with pytest.raises(ConfigError, match="budget key 'steps'=-5: must be >= 0"):
        track.budget({"steps": -5})


@pytest.mark.parametrize("method", ["full", "linear"])
def test_trial_end_to_end(cache, method):
    from harness.trial import TrialSpec
    from harness.finetune import run_trial

    track.prepare(track.settings(TINY), "cw10", ["window-close"], None)
    spec = TrialSpec(track="rl", benchmark="cw10", task="window-close", method=method, seed=0,
                     budget={"steps": 30, "eval_episodes": 2, "batch_size": 16, "report_every": 10},
                     track_settings=TINY)
    seen = []
    result = run_trial(spec, seen.append)  # the engine's record, through the harness' own entry point
    assert result.status == "ok", result.error
    m = result.metrics
    assert {"success", "success_any", "return", "final_loss", "pretrained_success"} <= set(m)
    assert 0 <= m["success"] <= m["success_any"] <= 1 and m["return"] > 0
    assert [r["update"] for r in seen[:3]] == [10, 20, 30]
    assert result.data_source == "real" and "scripted" in result.extra["data"]
    from agents.dt import DTConfig, DecisionTransformer

    total = DecisionTransformer(DTConfig(n_layer=1, n_head=2, n_embd=32, context=4)).num_params()
    assert result.head_params == 32 * 4 + 4
    assert result.trainable_params == (total - result.head_params if method == "full" else 0)
    assert (cache.root / "adapters").is_dir() and result.adapter_path


def test_trial_lora_if_available(cache):
    from harness.trial import TrialSpec
    from harness.finetune import run_trial

    spec = TrialSpec(track="rl", benchmark="cw10", task="window-close", method="lora", method_settings={"r": 2},
                     budget={"steps": 10, "eval_episodes": 2, "batch_size": 16}, track_settings=TINY)
    result = run_trial(spec, lambda r: None)
    assert result.status == "ok", result.error
    assert result.trainable_params == 1 * (2 * (32 + 96) + 2 * (32 + 32) + 2 * (32 + 128) + 2 * (128 + 32))


def test_nan_training_fails_the_trial(cache):
    from harness.trial import TrialSpec
    from harness.finetune import run_trial

    spec = TrialSpec(track="rl", benchmark="cw10", task="window-close", method="full",
                     method_settings={"lr": 1e30}, budget={"steps": 30, "eval_episodes": 1, "batch_size": 16},
                     track_settings={**TINY, "warmup": 0, "grad_clip": 0.0})
    record = run_trial(spec, lambda r: None)
    assert record.status == "failed" and "NonFiniteLossError" in record.error


def test_unknown_task_is_a_config_error(cache):
    with pytest.raises(ConfigError, match="valid"):
        track.prepare(track.settings(TINY), "cw10", ["reach"], None)


def test_bench_reports_speeds():
    out = track.bench(track.settings({**TINY, "bench_steps": 5, "bench_envs": 2, "bench_profile": True}))
    # the profile of the update: operators (kernels on a GPU) by class of work, the largest first
    prof = out["profile"]
    assert prof["counted"] == "CPU operators (aten)" and prof["wall_ms_per_update"] > 0
    assert 0 < prof["busy_ms_per_update"] and 0 < prof["busy_share"]
    assert sum(prof["classes"].values()) == pytest.approx(1.0, abs=0.01)
    assert {"matmul", "attention", "norm"} <= set(prof["classes"])  # the DT's own work is found and named
    times = [t["ms_per_update"] for t in prof["top"]]
    assert times == sorted(times, reverse=True) and any(t["class"] == "matmul" for t in prof["top"])
    eager = out["train"]["eager"]
    assert eager["harness_updates_per_s"] > 0 and eager["plain_updates_per_s"] > 0
    # the ratio is of the unrounded rates; the rates are reported rounded to 0.01, so their ratio may differ by
    # up to 0.005/h + 0.005/p relatively (large when a busy CPU makes a rate small), plus the ratio's own rounding
    h, p = eager["harness_updates_per_s"], eager["plain_updates_per_s"]
    assert eager["harness_over_plain"] == pytest.approx(h / p, rel=0.005 / h + 0.005 / p, abs=1e-3)
    rounds = eager["harness_over_plain_rounds"]  # the three alternations' own ratios, the median's spread
    assert len(rounds) == 3 and all(r > 0 for r in rounds)
    roll = out["rollout"]
    assert roll["dt_env_steps_per_s"] > 0 and roll["scripted_env_steps_per_s"] > 0
    assert roll["workers"] == 2 and roll["dt_over_scripted"] > 0
    # where the rollout's time goes: start-up (spawn, simulators) apart from the steps, which split into the
    # policy, waiting for simulators and the rest; no CUDA graphs on the CPU, so no capture
    assert roll["dt_start_s"] > 0 and roll["scripted_start_s"] > 0 and roll["dt_capture_s"] == 0
    assert roll["dt_policy_ms_per_step"] > 0 and roll["dt_wait_ms_per_step"] >= 0 and roll["dt_other_ms_per_step"] >= 0
    assert roll["scripted_ms_per_step"] > 0 and roll["dt_over_scripted_steady"] > 0
    # a kept pool's evaluation starts without spawning: its start-up is a re-seed and a reset
    assert 0 < roll["dt_kept_pool_start_s"] < roll["dt_start_s"] and roll["dt_kept_pool_env_steps_per_s"] > 0


def test_rollout_windows_are_the_episode_so_far():
    """Each step's forward sees the last ``context`` steps: left padding first, the current action and
    reward tokens still empty, return-to-go dropping by the observed rewards."""
    import numpy as np
    import torch

    from agents.data import SCALE
    from agents.dt import DTConfig, DecisionTransformer
    from agents.rollout import evaluate_dt

    seen = []

    class Recording(DecisionTransformer):
        def forward(self, **batch):
            seen.append({k: (v.clone() if v is not None else None) for k, v in batch.items()})
            return super().forward(**batch)

    K, T, target = 4, 10, 1000.0
    model = Recording(DTConfig(n_layer=1, n_head=2, n_embd=32, context=K, dropout=0.0))
    r = evaluate_dt(model, "reach", episodes=2, target_return=target, workers=1, seed=0, length=T)
    assert len(seen) == T
    first = seen[0]
    assert first["attention_mask"].tolist() == [[False, False, False, True]] * 2
    assert torch.allclose(first["returns_to_go"][:, -1, 0], torch.full((2,), target / SCALE))
    assert (first["states"][:, :-1] == 0).all() and (first["actions"] == 0).all()
    late = seen[K + 2]
    assert late["attention_mask"] is None  # nothing padded: the flash path
    assert late["timesteps"].tolist() == [list(range(3, 3 + K))] * 2
    assert (late["actions"][:, -1] == 0).all() and (late["rewards"][:, -1] == 0).all()
    step_rewards = late["rewards"][:, :-1, 0] * SCALE  # rewards of steps 3..5, observed
    drop = late["returns_to_go"][:, :-1, 0] - late["returns_to_go"][:, 1:, 0]
    assert torch.allclose(drop, step_rewards / SCALE, atol=1e-5)
    # the rewards the windows observed add up to the reported returns, less the last step's (never observed)
    observed = torch.stack([s["rewards"][:, -2, 0] for s in seen[1:]], 1).sum(1).double() * SCALE
    assert np.all(observed.numpy() <= np.array(r.returns) + 1e-3)
    assert np.allclose(observed.numpy(), np.array(r.returns), atol=12.0)  # a step's reward is at most 10


def test_rollout_in_two_overlapping_groups_gives_the_same_episodes():
    from agents.dt import DTConfig, DecisionTransformer
    from agents.rollout import evaluate_dt

    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(n_layer=1, n_head=2, n_embd=32, context=4, dropout=0.0))
    one = evaluate_dt(model, "reach", episodes=4, target_return=1500.0, workers=1, seed=3, length=30)
    two = evaluate_dt(model, "reach", episodes=4, target_return=1500.0, workers=4, seed=3, length=30)
    # four workers, one group (rollout_groups: 1): one forward for all four a step
    joined = evaluate_dt(model, "reach", episodes=4, target_return=1500.0, workers=4, seed=3, length=30, groups=1)
    assert np.allclose(one.returns, two.returns, rtol=1e-4) and one.success_any == two.success_any
    assert np.allclose(joined.returns, two.returns, rtol=1e-4) and joined.success_any == two.success_any
    assert len(set(np.round(one.returns, 3))) > 1  # distinct episodes: the comparison can fail
    model.train()
    with pytest.raises(ValueError, match="groups must be 1 or 2, not 3"):
        evaluate_dt(model, "reach", episodes=4, target_return=1500.0, workers=2, seed=3, length=5, groups=3)
    assert model.training  # refused before the model left its mode


def test_a_trials_rollouts_keep_their_workers_and_score_the_same_episodes():
    """One pool for a trial's evaluations (a scheduler's rungs and the final one): the same worker processes
    every time, the episodes a fresh evaluation with the same seed scores, a new pool after a failed
    evaluation (its pipes may hold unread answers), no worker left after close."""
    from agents.dt import DTConfig, DecisionTransformer
    from agents.rollout import TrialRollouts, evaluate_dt

    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(n_layer=1, n_head=2, n_embd=32, context=4, dropout=0.0))
    fresh = evaluate_dt(model, "reach", episodes=3, target_return=1500.0, workers=2, seed=5, length=30)
    with TrialRollouts("reach", 3, 2, seed=5, length=30) as rollouts:
        assert rollouts.worker_pids == []
        rollouts.start()
        pids = rollouts.worker_pids
        first, second = (rollouts.evaluate(model, 1500.0) for _ in range(2))
        assert rollouts.worker_pids == pids and len(pids) == 2
        assert first.returns == second.returns and np.allclose(first.returns, fresh.returns, rtol=1e-5)
        assert len(set(np.round(fresh.returns, 3))) > 1  # distinct episodes: the comparison can fail
        procs = list(rollouts._pool.procs)

        def broken(*a, **k):
            raise RuntimeError("forward failed")

        model.forward = broken
        with pytest.raises(RuntimeError, match="forward failed"):
            rollouts.evaluate(model, 1500.0)
        assert rollouts.worker_pids == [] and not any(p.is_alive() for p in procs)
        del model.forward
        again = rollouts.evaluate(model, 1500.0)
        assert np.allclose(again.returns, fresh.returns, rtol=1e-5) and set(rollouts.worker_pids).isdisjoint(pids)
        procs = list(rollouts._pool.procs)
    assert rollouts.worker_pids == [] and not any(p.is_alive() for p in procs)
    with pytest.raises(ValueError, match="seed 5.*seed 6"):
        with TrialRollouts("reach", 3, 2, seed=5, length=30) as other:
            other.start()
            evaluate_dt(model, "reach", 3, 1500.0, 2, 6, length=30, pool=other._pool)


def test_an_rl_trial_leaves_no_rollout_worker_behind(cache):
    """The trial's evaluation workers start with its setup and are gone once its record is made, while the
    run (and the setup it holds) is still alive: closed by the engine, not by garbage collection."""
    import multiprocessing

    from harness.finetune import FineTuneRun
    from harness.trial import TrialSpec

    before = {p.pid for p in multiprocessing.active_children()}
    spec = TrialSpec(track="rl", benchmark="cw10", task="window-close", method="lora", seed=0,
                     method_settings={"r": 2}, budget={"steps": 4, "eval_episodes": 2, "batch_size": 8},
                     track_settings={**TINY, "warmup": 0})
    run = FineTuneRun(spec, lambda r: None)
    run.start()
    assert len({p.pid for p in multiprocessing.active_children()} - before) == 2  # spawned with the setup
    while run.step():
        pass
    record = run.finish()
    assert record.status == "ok", record.error
    assert run.setup is not None and {p.pid for p in multiprocessing.active_children()} - before == set()


def test_a_rung_evaluation_leaves_training_as_it_was(cache):
    """Under ASHA a selection trial is scored at its rungs (``FineTuneRun.interim_metrics``) and trains on:
    that scoring must not change what it trains (train/eval modes, dropout's and the batches' random
    streams), or a scheduled selection ranks other models than the grid would. Deterministic kernels,
    dropout on, LoRA: the record after a rung evaluation equals the one without."""
    from harness.finetune import FineTuneRun
    from harness.trial import TrialSpec

    settings = {**TINY, "dropout": 0.1, "deterministic": True}
    track.prepare(track.settings(settings), "cw10", ["window-close"], None)
    spec = TrialSpec(track="rl", benchmark="cw10", task="window-close", method="lora", method_settings={"r": 2},
                     budget={"steps": 20, "eval_episodes": 2, "batch_size": 16}, track_settings=settings)

    def trained(rung: int | None) -> tuple[dict, dict]:
        run = FineTuneRun(spec, lambda r: None)
        run.start()
        interim = {}
        while run.step():
            if run.updates_done == rung:
                interim = run.interim_metrics()
        record = run.finish()
        assert record.status == "ok", record.error
        return record.metrics, interim

    plain, _ = trained(None)
    scored, interim = trained(10)
    assert {"success", "return"} <= set(interim)
    assert scored["final_loss"] == plain["final_loss"]
    assert (scored["success"], scored["return"]) == (plain["success"], plain["return"])


@pytest.mark.parametrize("method", ["full", "lora", "vera", "nola"])
def test_every_method_trains_with_the_bases_dropout_on(cache, method):
    """The RL track builds its DT in eval mode and peft wraps it as it is: the training loop must still
    put every module in train mode, so that the recipe's dropout acts for a peft method (lora, vera) as for
    full fine-tuning and the harness's own methods (nola). Before, peft-wrapped methods trained without it."""
    from harness.finetune import FineTuneRun
    from harness.trial import TrialSpec

    settings = {**TINY, "dropout": 0.1}
    track.prepare(track.settings(settings), "cw10", ["window-close"], None)
    spec = TrialSpec(track="rl", benchmark="cw10", task="window-close", method=method,
                     budget={"steps": 3, "eval_episodes": 1, "batch_size": 8}, track_settings=settings)
    run = FineTuneRun(spec, lambda r: None)
    run.start()
    try:
        assert run.step()
        dropouts = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(m.training for m in dropouts)
    finally:
        run.close()

"""RL track: task sets, the env factory, dataset generation and caching, the window sampler."""

from __future__ import annotations

import numpy as np
import pytest

from harness.cache import ArtifactCache
from harness.errors import ConfigError


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return ArtifactCache(tmp_path / "cache")


def test_task_sets_match_metaworld():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    from agents.tasks import CW10, MT40, MT50

    assert sorted(MT50) == sorted(n[:-3] for n in ALL_V3_ENVIRONMENTS)
    assert CW10[0] == "hammer" and CW10[-1] == "peg-unplug-side" and len(CW10) == 10
    assert set(CW10) | set(MT40) == set(MT50) and not set(CW10) & set(MT40)
    assert len(MT40) == 40


def test_unknown_task_names_the_choices():
    from agents.tasks import make_env

    with pytest.raises(ConfigError, match="window-close"):
        make_env("window-clos")


def test_env_200_steps_float32_and_resampled_goals():
    from agents.tasks import make_env

    env = make_env("reach", seed=3)
    goals = []
    for _ in range(2):
        obs, _ = env.reset()
        goals.append(obs[36:39].copy())
        assert obs.dtype == np.float32 and obs.shape == (39,)
        steps, truncated = 0, False
        while not truncated:
            obs, r, terminated, truncated, info = env.step(env.action_space.sample())
            steps += 1
            assert not terminated
        assert steps == 200
    assert not np.allclose(goals[0], goals[1])  # resampled at every reset
    again = make_env("reach", seed=3).reset()[0]
    assert np.allclose(again[36:39], goals[0])  # seeded


def test_data_cached_reused_and_truncated_file_rebuilt(cache):
    from agents.data import FILE, KIND, DataSettings, Episodes, build_datasets

    s = DataSettings(episodes=2, noise_levels=(0.0, 0.5), seed=1, episode_length=200)
    paths = build_datasets(["window-close"], s, workers=1, cache=cache)
    ep = Episodes.load(paths["window-close"])
    assert ep.observations.shape == (2, 200, 39) and ep.actions.shape == (2, 200, 4)
    assert list(ep.noise) == [0.0, 0.5] and ep.dones[:, -1].all() and not ep.dones[:, :-1].any()
    assert np.abs(ep.actions).max() <= 1.0
    rtg = ep.returns_to_go()
    assert np.allclose(rtg[:, 0], ep.rewards.sum(1), rtol=1e-5) and np.allclose(rtg[:, -1], ep.rewards[:, -1])
    mtime = paths["window-close"].stat().st_mtime_ns
    again = build_datasets(["window-close"], s, workers=1, cache=cache, log=lambda m: pytest.fail(f"rebuilt: {m}"))
    assert again["window-close"].stat().st_mtime_ns == mtime
    # Truncate the cached file: detected on load, rebuilt, same content (seeded).
    data = paths["window-close"].read_bytes()
    paths["window-close"].write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = build_datasets(["window-close"], s, workers=1, cache=cache)
    assert np.array_equal(Episodes.load(rebuilt["window-close"]).actions, ep.actions)
    assert (cache.root / KIND).is_dir() and rebuilt["window-close"].name == FILE


def _episodes(E=3, T=200):
    from agents.data import Episodes

    rng = np.random.default_rng(0)
    obs = rng.standard_normal((E, T, 39)).astype(np.float32)
    obs[..., 0] = np.arange(T)  # state feature 0 = step index, to check alignment
    rewards = np.tile(np.arange(T, dtype=np.float32), (E, 1))
    dones = np.zeros((E, T), bool)
    dones[:, -1] = True
    return Episodes(obs, rng.uniform(-1, 1, (E, T, 4)).astype(np.float32), rewards, dones,
                    np.zeros((E, T), bool), np.zeros(E, np.float32))


def test_sampler_padding_mask_and_scaled_rtg():
    from agents.data import SCALE, WindowSampler

    ep = _episodes()
    K = 20
    s = WindowSampler(ep, K, seed=0)
    b = {k: v.numpy() for k, v in s.sample(512).items()}
    mask, steps = b["attention_mask"], b["timesteps"]
    assert b["states"].shape == (512, K, 39) and b["returns_to_go"].shape == (512, K, 1)
    # Left padding only: once a window starts it runs to its end.
    assert (np.diff(mask.astype(int), axis=1) >= 0).all() and mask[:, -1].all()
    assert (~mask).any()  # windows near an episode's end are truncated and padded
    assert (b["states"][~mask] == 0).all() and (b["returns_to_go"][~mask] == 0).all()
    assert np.array_equal(b["states"][..., 0][mask], steps[mask].astype(np.float32))
    # Consecutive steps inside a window; a truncated window ends at the episode's last step.
    ok = mask[:, 1:] & mask[:, :-1]
    assert (np.diff(steps, axis=1)[ok] == 1).all()
    short = ~mask[:, 0]
    assert (steps[short, -1] == 199).all()
    rtg_expected = (np.arange(200)[::-1].cumsum()[::-1]) / SCALE
    assert np.allclose(b["returns_to_go"][..., 0][mask], rtg_expected[steps[mask]])
    assert np.allclose(b["rewards"][..., 0][mask], steps[mask] / SCALE)

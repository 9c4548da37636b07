"""Offline datasets from Meta-World's scripted policies with Gaussian action noise, and the window sampler.

The papers trained on the replay buffers of SAC agents (mixed quality); our stand-in is the scripted
expert with noise at several levels, clipped to [-1, 1], so a task's data spans failed and successful
episodes and a range of returns (the DT needs that spread to condition on return).

Generation runs in worker processes ("spawn", safe inside Ray and next to torch threads). Work is cut
into fixed units of (task, noise level, unit index), each with its own seed, so the data does not depend
on how many processes made it. Each task is cached on its own (kind ``rl-data``) as one ``.npz``.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from harness.cache import ArtifactCache, settings_hash
from harness.errors import ConfigError, DataError
from agents.tasks import ACT_DIM, EPISODE_LENGTH, OBS_DIM, check_task, make_env, scripted_policy

if TYPE_CHECKING:  # torch is imported lazily: the spawned data workers never need it
    import torch

KIND = "rl-data"
FILE = "episodes.npz"
SCALE = 200.0  # return-to-go and reward tokens are divided by this (L2M)
UNIT = 8  # episodes per work unit: small enough to balance across processes


@dataclass(frozen=True)
class DataSettings:
    """What defines a task's dataset (the cache key, with the task name)."""

    episodes: int = 40  # per task, split evenly over the noise levels
    noise_levels: tuple[float, ...] = (0.0, 0.1, 0.3, 0.6)
    seed: int = 0
    episode_length: int = EPISODE_LENGTH

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ConfigError(f"data episodes per task must be >= 1, got {self.episodes}")
        if not self.noise_levels or any(n < 0 for n in self.noise_levels):
            raise ConfigError(f"noise levels must be a non-empty list of values >= 0, got {self.noise_levels}")
        object.__setattr__(self, "noise_levels", tuple(float(n) for n in self.noise_levels))

    def key(self, task: str) -> dict[str, Any]:
        return {"task": task, "episodes": self.episodes, "noise_levels": list(self.noise_levels),
                "seed": self.seed, "episode_length": self.episode_length, "policy": "metaworld-scripted-v3"}


@dataclass
class Episodes:
    """A task's episodes, all arrays indexed [episode, step]; every episode runs ``episode_length`` steps."""

    observations: np.ndarray  # float32 (E, T, 39)
    actions: np.ndarray  # float32 (E, T, 4), the noisy actions actually taken
    rewards: np.ndarray  # float32 (E, T)
    dones: np.ndarray  # bool (E, T), True at the last step
    successes: np.ndarray  # bool (E, T), info["success"] per step
    noise: np.ndarray  # float32 (E,), the noise level of each episode

    @property
    def returns(self) -> np.ndarray:
        return self.rewards.sum(1)

    def returns_to_go(self) -> np.ndarray:
        """Undiscounted suffix sums of the rewards, per episode (E, T)."""
        return np.flip(np.cumsum(np.flip(self.rewards, 1), 1), 1).astype(np.float32)

    def summary(self) -> dict[str, float]:
        return {"episodes": int(len(self.noise)), "mean_return": float(self.returns.mean()),
                "max_return": float(self.returns.max()),
                "success_last": float(self.successes[:, -1].mean()),
                "success_any": float(self.successes.any(1).mean())}

    def save(self, path: Path) -> None:
        np.savez(path, observations=self.observations, actions=self.actions, rewards=self.rewards,
                 dones=self.dones, successes=self.successes, noise=self.noise)

    @classmethod
    def load(cls, path: Path) -> "Episodes":
        try:
            with np.load(path) as z:
                return cls(**{k: z[k] for k in ("observations", "actions", "rewards", "dones", "successes", "noise")})
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: not a readable RL dataset ({e})") from e

    @classmethod
    def concat(cls, parts: Sequence["Episodes"]) -> "Episodes":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("observations", "actions", "rewards", "dones", "successes", "noise")))


def _unit_seed(seed: int, task: str, noise_index: int, unit: int) -> int:
    return int(settings_hash({"seed": seed, "task": task, "noise": noise_index, "unit": unit})[:8], 16)


def _run_unit(task: str, noise: float, count: int, seed: int, length: int) -> Episodes:
    """``count`` noisy scripted episodes of ``task`` (runs in a worker process)."""
    env = make_env(task, seed=seed, max_episode_steps=length)
    policy = scripted_policy(task)
    rng = np.random.default_rng(seed)
    obs_all = np.zeros((count, length, OBS_DIM), np.float32)
    act_all = np.zeros((count, length, ACT_DIM), np.float32)
    rew_all = np.zeros((count, length), np.float32)
    suc_all = np.zeros((count, length), bool)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scripted policies warn about their own gains
        for e in range(count):
            obs, _ = env.reset()
            for t in range(length):
                action = policy.get_action(obs) + noise * rng.standard_normal(ACT_DIM)
                action = np.clip(action, -1.0, 1.0).astype(np.float32)
                obs_all[e, t], act_all[e, t] = obs, action
                obs, reward, terminated, truncated, info = env.step(action)
                rew_all[e, t], suc_all[e, t] = reward, bool(info["success"])
                if terminated:  # never with terminate_on_success off; guard so the array stays honest
                    raise DataError(f"{task}: episode terminated early at step {t}")
    env.close()
    dones = np.zeros((count, length), bool)
    dones[:, -1] = True
    return Episodes(obs_all, act_all, rew_all, dones, suc_all, np.full(count, noise, np.float32))


def _units(task: str, settings: DataSettings) -> list[tuple]:
    """Fixed work units for one task: episodes spread evenly over noise levels, cut into UNIT-sized pieces."""
    levels = settings.noise_levels
    per_level = [settings.episodes // len(levels) + (i < settings.episodes % len(levels)) for i in range(len(levels))]
    units = []
    for i, (noise, n) in enumerate(zip(levels, per_level)):
        for u, start in enumerate(range(0, n, UNIT)):
            units.append((task, noise, min(UNIT, n - start), _unit_seed(settings.seed, task, i, u),
                          settings.episode_length))
    return units


def say(message: str) -> None:
    """Progress to the console, flushed (it often goes to a log file or a Ray worker's stream)."""
    print(message, flush=True)


def default_workers() -> int:
    """One generating process per core this process may use: every core of the host in the sweep's
    driver, the trial's own under Ray."""
    from harness.placement import usable_cpus

    return usable_cpus()


def build_datasets(tasks: Sequence[str], settings: DataSettings, workers: int | None = None,
                   cache: ArtifactCache | None = None, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Generate (or reuse from the cache) every task's dataset; returns task -> path of its ``.npz``."""
    cache = cache or ArtifactCache()
    log = log or say
    for t in tasks:
        check_task(t)
    paths: dict[str, Path] = {}
    missing = []
    for t in tasks:
        found = cache.lookup(KIND, t, settings.key(t))
        if found is not None:
            paths[t] = found.file(FILE)
        else:
            missing.append(t)
    if not missing:
        return paths
    work = {t: _units(t, settings) for t in missing}
    workers = max(1, min(workers or default_workers(), sum(len(u) for u in work.values())))
    started = time.time()
    log(f"[rl-data] generating {len(missing)} task(s) x {settings.episodes} episodes with {workers} process(es)")
    from harness.progress import progress

    with progress(len(missing), "rl-data", unit="task") as bar:
        if workers == 1:
            for t in missing:
                paths[t] = _store(cache, t, settings, [_run_unit(*u) for u in work[t]], log)
                bar.update(1)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {t: [pool.submit(_run_unit, *u) for u in us] for t, us in work.items()}
                for t in missing:  # store each task as soon as its units finish: nothing finished is lost
                    paths[t] = _store(cache, t, settings, [f.result() for f in futures[t]], log)
                    bar.update(1)
    log(f"[rl-data] done in {time.time() - started:.1f}s")
    return paths


def _store(cache: ArtifactCache, task: str, settings: DataSettings, parts: list[Episodes],
           log: Callable[[str], None]) -> Path:
    episodes = Episodes.concat(parts)

    def build(folder: Path) -> None:
        episodes.save(folder / FILE)

    art = cache.get_or_build(KIND, task, settings.key(task), build)
    s = episodes.summary()
    log(f"[rl-data] {task}: {s['episodes']} episodes, return mean {s['mean_return']:.0f} max {s['max_return']:.0f}, "
        f"success last-step {s['success_last']:.2f} any-step {s['success_any']:.2f}")
    return art.file(FILE)


def load_dataset(task: str, settings: DataSettings, workers: int | None = None,
                 cache: ArtifactCache | None = None, log: Callable[[str], None] | None = None) -> Episodes:
    """A task's episodes, generating them first when not cached."""
    return Episodes.load(build_datasets([task], settings, workers, cache, log)[task])


class WindowSampler:
    """Random training windows over one or more tasks' episodes, as batched tensors on ``device``.

    A window: a random episode, a random start step, ``context`` steps truncated at the episode end and
    left-padded (zeros, mask False). Return-to-go and reward are divided by ``SCALE``. Every episode has
    the same length, so drawing episodes uniformly from the concatenation mixes tasks in proportion to
    their episode counts (equal by construction). The episodes live on the device and windows are
    gathered there with the sampler's own generator: no host work and no copy per batch on a GPU.
    """

    def __init__(self, episodes: Episodes | Sequence[Episodes], context: int, seed: int = 0,
                 device: "torch.device | str" = "cpu"):
        import torch

        ep = episodes if isinstance(episodes, Episodes) else Episodes.concat(list(episodes))
        self.device = torch.device(device)
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=self.device)  # noqa: E731
        self.obs = as_tensor(ep.observations)
        self.act = as_tensor(ep.actions)
        self.rew = as_tensor(ep.rewards / SCALE)
        self.rtg = as_tensor(ep.returns_to_go() / SCALE)
        self.context = int(context)
        self.n_episodes, self.length = ep.rewards.shape
        self.max_return = float(ep.returns.max())
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    def fork(self, seed: int) -> "WindowSampler":
        """A sampler over the same episodes (sharing their memory) with its own generator."""
        import copy

        import torch

        other = copy.copy(self)
        other.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return other

    def sample(self, batch_size: int) -> dict[str, "torch.Tensor"]:
        import torch

        K, T, dev, g = self.context, self.length, self.device, self.generator
        ep = torch.randint(0, self.n_episodes, (batch_size, 1), device=dev, generator=g)
        start = torch.randint(0, T, (batch_size, 1), device=dev, generator=g)
        pad = K - torch.clamp(T - start, max=K)  # left padding of each window
        pos = torch.arange(K, device=dev)[None, :]
        mask = pos >= pad
        step = torch.where(mask, start + pos - pad, 0)
        m = mask.unsqueeze(-1)
        return {
            "states": self.obs[ep, step] * m,
            "actions": self.act[ep, step] * m,
            "returns_to_go": (self.rtg[ep, step] * mask).unsqueeze(-1),
            "rewards": (self.rew[ep, step] * mask).unsqueeze(-1),
            "timesteps": step,
            "attention_mask": mask,
        }

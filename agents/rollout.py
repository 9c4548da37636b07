"""Rollout evaluation: many Meta-World environments in worker processes, one batched DT forward per step.

Workers are started with the "spawn" context (safe next to torch's threads and inside Ray workers) and
import only the env code, never torch. Each worker hosts one or more environments; the parent sends a
whole step's actions at once and gets back observations, rewards and success flags. Workers are closed
on exit and terminated on error (``RolloutPool`` is a context manager).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any, Sequence

import numpy as np

from agents.tasks import ACT_DIM, EPISODE_LENGTH, OBS_DIM, check_task

SCALE = 200.0  # the DT's return/reward token scale (agents.data.SCALE; kept here so workers skip numpy IO code)


def _worker(conn, task: str, seeds: list[int], length: int) -> None:
    """Worker loop: owns ``len(seeds)`` envs of ``task``; answers reset / step / scripted / close."""
    import warnings

    from agents.tasks import make_env, scripted_policy

    warnings.simplefilter("ignore")
    envs = [make_env(task, seed=s, max_episode_steps=length) for s in seeds]
    policy = scripted_policy(task)
    rng = np.random.default_rng(seeds[0] if seeds else 0)
    obs = np.zeros((len(envs), OBS_DIM), np.float32)
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "reset":
                for i, env in enumerate(envs):
                    obs[i] = env.reset()[0]
                conn.send(obs.copy())
            elif cmd in ("step", "scripted"):
                if cmd == "scripted":  # arg: action noise std
                    actions = np.stack([policy.get_action(o) for o in obs]) + arg * rng.standard_normal((len(envs), ACT_DIM))
                    actions = np.clip(actions, -1, 1)
                else:
                    actions = arg
                rewards = np.zeros(len(envs), np.float32)
                success = np.zeros(len(envs), bool)
                for i, env in enumerate(envs):
                    o, r, _, _, info = env.step(np.asarray(actions[i], np.float32))
                    obs[i], rewards[i], success[i] = o, r, bool(info["success"])
                conn.send((obs.copy(), rewards, success))
            elif cmd == "close":
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        for env in envs:
            env.close()
        conn.close()


@dataclass
class RolloutResult:
    """Scores of one batch of episodes (one per environment)."""

    task: str
    episodes: int
    success: float  # info["success"] at the last step (the papers' code; the leaderboard's primary metric)
    success_any: float  # success at any step (Meta-World's / Continual World's convention)
    return_mean: float
    returns: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    env_steps_per_s: float = 0.0
    target_return: float = 0.0

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}success": self.success, f"{prefix}success_any": self.success_any,
                f"{prefix}return": self.return_mean}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RolloutPool:
    """``n_envs`` environments of one task spread over ``workers`` spawned processes."""

    def __init__(self, task: str, n_envs: int, workers: int, seed: int = 0, length: int = EPISODE_LENGTH):
        check_task(task)
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.task, self.n_envs, self.length = task, n_envs, length
        workers = max(1, min(workers, n_envs))
        # Disjoint env seeds per evaluation seed: eval episodes never reuse one another's start states.
        seeds = [10_007 * seed + 1_000_003 + i for i in range(n_envs)]
        self.split = np.array_split(np.arange(n_envs), workers)
        ctx = get_context("spawn")
        self.conns, self.procs = [], []
        try:
            for part in self.split:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, task, [seeds[i] for i in part], length), daemon=True)
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)
        except BaseException:
            self.close(force=True)
            raise

    def _gather(self, cmd: str, args: Sequence[Any]):
        for conn, a in zip(self.conns, args):
            conn.send((cmd, a))
        return [conn.recv() for conn in self.conns]

    def reset(self) -> np.ndarray:
        return np.concatenate(self._gather("reset", [None] * len(self.conns)))

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = self._gather("step", [actions[idx] for idx in self.split])
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]

    def step_scripted(self, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = self._gather("scripted", [noise] * len(self.conns))
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]

    def close(self, force: bool = False) -> None:
        for conn in self.conns:
            try:
                if not force:
                    conn.send(("close", None))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=0 if force else 5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []

    def __enter__(self) -> "RolloutPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(force=exc_type is not None)


def _score(task: str, rewards: np.ndarray, successes: np.ndarray, wall: float, target: float) -> RolloutResult:
    n, T = rewards.shape
    returns = rewards.sum(1)
    return RolloutResult(task=task, episodes=n, success=float(successes[:, -1].mean()),
                         success_any=float(successes.any(1).mean()), return_mean=float(returns.mean()),
                         returns=[float(r) for r in returns], wall_s=wall,
                         env_steps_per_s=n * T / wall if wall > 0 else 0.0, target_return=target)


def evaluate_dt(model, task: str, episodes: int, target_return: float, workers: int = 1, seed: int = 0,
                device=None, length: int = EPISODE_LENGTH) -> RolloutResult:
    """Roll out the DT on ``episodes`` parallel environments of ``task``.

    ``target_return`` is unscaled (the dataset's best return); the return-to-go token starts at it and
    drops by each observed reward; the current step's reward token is 0 until observed.
    """
    import torch

    from harness.training import autocast

    device = device or next(model.parameters()).device
    K = int(getattr(getattr(model, "cfg", None), "context", 0) or _find_cfg(model).context)
    N, T = episodes, length
    states = np.zeros((N, T, OBS_DIM), np.float32)
    actions = np.zeros((N, T, ACT_DIM), np.float32)
    rtg = np.zeros((N, T, 1), np.float32)
    rew = np.zeros((N, T, 1), np.float32)
    rewards = np.zeros((N, T), np.float32)
    successes = np.zeros((N, T), bool)
    was_training = model.training
    model.eval()
    t0 = time.time()
    try:
        with RolloutPool(task, N, workers, seed, length) as pool:
            states[:, 0] = pool.reset()
            rtg[:, 0] = target_return / SCALE
            for t in range(T):
                lo = max(0, t + 1 - K)
                n = t + 1 - lo
                pad = K - n
                window = {k: np.zeros((N, K) + a.shape[2:], np.float32) for k, a in
                          (("states", states), ("actions", actions), ("returns_to_go", rtg), ("rewards", rew))}
                for k, a in (("states", states), ("actions", actions), ("returns_to_go", rtg), ("rewards", rew)):
                    window[k][:, pad:] = a[:, lo:t + 1]
                steps = np.zeros((N, K), np.int64)
                steps[:, pad:] = np.arange(lo, t + 1)
                mask = np.zeros((N, K), bool)
                mask[:, pad:] = True
                batch = {k: torch.from_numpy(v).to(device) for k, v in window.items()}
                with torch.no_grad(), autocast(device):
                    pred = model(states=batch["states"], actions=batch["actions"],
                                 returns_to_go=batch["returns_to_go"], rewards=batch["rewards"],
                                 timesteps=torch.from_numpy(steps).to(device),
                                 attention_mask=torch.from_numpy(mask).to(device))
                act = pred[:, -1].float().clamp(-1, 1).cpu().numpy()
                actions[:, t] = act
                obs, r, s = pool.step(act)
                rewards[:, t], successes[:, t] = r, s
                rew[:, t, 0] = r / SCALE
                if t + 1 < T:
                    states[:, t + 1] = obs
                    rtg[:, t + 1] = rtg[:, t] - r[:, None] / SCALE
    finally:
        model.train(was_training)
    return _score(task, rewards, successes, time.time() - t0, target_return)


def _find_cfg(model):
    for m in model.modules():
        if hasattr(m, "cfg") and hasattr(m.cfg, "context"):
            return m.cfg
    raise ValueError("cannot find the DT config (context length) in the model")


def evaluate_scripted(task: str, episodes: int, workers: int = 1, seed: int = 0, noise: float = 0.0,
                      length: int = EPISODE_LENGTH) -> RolloutResult:
    """The scripted policy on the same worker setup (acting inside the workers): a reference for speed."""
    rewards = np.zeros((episodes, length), np.float32)
    successes = np.zeros((episodes, length), bool)
    t0 = time.time()
    with RolloutPool(task, episodes, workers, seed, length) as pool:
        pool.reset()
        for t in range(length):
            _, rewards[:, t], successes[:, t] = pool.step_scripted(noise)
    return _score(task, rewards, successes, time.time() - t0, 0.0)

"""Offline datasets from Meta-World's scripted policies with Gaussian action noise, and the window sampler.

The papers trained on the replay buffers of SAC agents (mixed quality); our stand-in is the scripted
expert with noise at several levels, clipped to [-1, 1], so a task's data spans failed and successful
episodes and a range of returns (the DT needs that spread to condition on return).

The expert is :class:`agents.tasks.Expert`: the scripted policy with two general corrections (a grab
effort of 0 opens the gripper; once ``info["success"]`` the arm holds) so that its episodes end in
success wherever the task allows. Which hold a task uses (``stop`` or ``freeze``) is measured once per
task on noise-free calibration episodes of their own (cached, kind ``rl-expert``); ``expert: scripted``
gives the policies unchanged.

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

from harness.cache import ArtifactCache, atomic_write_text, settings_hash
from harness.errors import ConfigError, DataError
from harness.placement import usable_cpus
from harness.progress import progress
from agents.tasks import (ACT_DIM, CW10, EPISODE_LENGTH, EXPERTS, EXPERT_POLICY, HOLD_MODES, OBS_DIM, SCRIPTED_POLICY,
                          Expert, check_task, make_env)

if TYPE_CHECKING:  # torch is imported lazily: the spawned data workers never need it
    import torch

KIND = "rl-data"
FILE = "episodes.npz"
SCALE = 200.0  # return-to-go and reward tokens are divided by this (L2M)
UNIT = 8  # episodes per work unit: small enough to balance across processes
EXPERT_KIND = "rl-expert"
CALIBRATION_EPISODES = 4  # noise-free episodes per hold mode when a task's hold is chosen
CALIBRATION_SEED = 999_983  # env seed of the calibration episodes (data units use 32-bit hashes)
HOLD_TOLERANCE = 0.05  # last-step success this close to any-step success counts as holding


@dataclass(frozen=True)
class DataSettings:
    """What defines a task's dataset (the cache key, with the task name)."""

    episodes: int = 40  # per task, split evenly over the noise levels
    noise_levels: tuple[float, ...] = (0.0, 0.1, 0.3, 0.6)
    seed: int = 0
    episode_length: int = EPISODE_LENGTH
    expert: str = "hold"  # "hold": agents.tasks.Expert's corrections; "scripted": metaworld's policies as shipped

    def __post_init__(self) -> None:
        if self.expert not in EXPERTS:
            raise ConfigError(f"expert {self.expert!r} is not one of {', '.join(EXPERTS)}")
        if self.episodes < 1:
            raise ConfigError(f"data episodes per task must be >= 1, got {self.episodes}")
        if not self.noise_levels or any(n < 0 for n in self.noise_levels):
            raise ConfigError(f"noise levels must be a non-empty list of values >= 0, got {self.noise_levels}")
        object.__setattr__(self, "noise_levels", tuple(float(n) for n in self.noise_levels))

    def key(self, task: str) -> dict[str, Any]:
        return {"task": task, "episodes": self.episodes, "noise_levels": list(self.noise_levels),
                "seed": self.seed, "episode_length": self.episode_length, "policy": self.policy_id}

    @property
    def policy_id(self) -> str:
        """Names the expert in cache keys (the scripted policies' id is the one older datasets carry)."""
        return SCRIPTED_POLICY if self.expert == "scripted" else f"{EXPERT_POLICY}-cal{CALIBRATION_EPISODES}"


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

    def by_noise(self) -> list[dict[str, float]]:
        """Per noise level: episodes, last-step and any-step success, return min / mean / max."""
        rows = []
        for level in sorted(set(self.noise.tolist())):
            pick = self.noise == level
            ret, suc = self.returns[pick], self.successes[pick]
            rows.append({"noise": float(level), "episodes": int(pick.sum()), "success_last": float(suc[:, -1].mean()),
                         "success_any": float(suc.any(1).mean()), "return_min": float(ret.min()),
                         "return_mean": float(ret.mean()), "return_max": float(ret.max())})
        return rows

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


def _run_unit(task: str, noise: float, count: int, seed: int, length: int, hold: str | None) -> Episodes:
    """``count`` noisy expert episodes of ``task`` (runs in a worker process)."""
    env = make_env(task, seed=seed, max_episode_steps=length)
    expert = Expert(task, env, hold)
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
            expert.reset()
            for t in range(length):
                action = expert.act(obs) + noise * rng.standard_normal(ACT_DIM)
                action = np.clip(action, -1.0, 1.0).astype(np.float32)
                obs_all[e, t], act_all[e, t] = obs, action
                obs, reward, terminated, truncated, info = env.step(action)
                rew_all[e, t], suc_all[e, t] = reward, bool(info["success"])
                expert.observe(obs, suc_all[e, t])
                if terminated:  # never with terminate_on_success off; guard so the array stays honest
                    raise DataError(f"{task}: episode terminated early at step {t}")
    env.close()
    dones = np.zeros((count, length), bool)
    dones[:, -1] = True
    return Episodes(obs_all, act_all, rew_all, dones, suc_all, np.full(count, noise, np.float32))


def _calibrate(task: str, length: int) -> dict[str, Any]:
    """Each hold mode's noise-free last-step and any-step success on the calibration episodes (the same
    start states for every mode), and the mode chosen: the best last-step success, ties to the first."""
    import warnings

    scores: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in HOLD_MODES:
            env = make_env(task, seed=CALIBRATION_SEED, max_episode_steps=length)
            expert = Expert(task, env, mode)
            last, hit = [], []
            for _ in range(CALIBRATION_EPISODES):
                obs, _ = env.reset()
                expert.reset()
                seen = False
                for _ in range(length):
                    obs, _, _, _, info = env.step(np.clip(expert.act(obs), -1, 1).astype(np.float32))
                    success = bool(info["success"])
                    expert.observe(obs, success)
                    seen |= success
                last.append(success)
                hit.append(seen)
            env.close()
            scores[mode] = {"success_last": float(np.mean(last)), "success_any": float(np.mean(hit))}
    mode = max(HOLD_MODES, key=lambda m: (scores[m]["success_last"], -HOLD_MODES.index(m)))
    best = scores[mode]
    return {"task": task, "mode": mode, "modes": scores, "episodes": CALIBRATION_EPISODES,
            "holds_success": best["success_last"] >= best["success_any"] - HOLD_TOLERANCE}


def _expert_key(task: str, length: int) -> dict[str, Any]:
    return {"task": task, "policy": EXPERT_POLICY, "episodes": CALIBRATION_EPISODES, "seed": CALIBRATION_SEED,
            "episode_length": length, "modes": list(HOLD_MODES), "tolerance": HOLD_TOLERANCE}


def _store_calibration(cache: ArtifactCache, task: str, length: int, result: dict[str, Any]) -> dict[str, Any]:
    import json

    def build(folder: Path) -> None:
        (folder / "expert.json").write_text(json.dumps(result, indent=1))

    art = cache.get_or_build(EXPERT_KIND, task, _expert_key(task, length), build)
    return json.loads(art.file("expert.json").read_text())


def _cached_calibration(cache: ArtifactCache, task: str, length: int) -> dict[str, Any] | None:
    import json

    found = cache.lookup(EXPERT_KIND, task, _expert_key(task, length))
    return None if found is None else json.loads(found.file("expert.json").read_text())


def expert_hold(task: str, episode_length: int = EPISODE_LENGTH, cache: ArtifactCache | None = None) -> dict[str, Any]:
    """The hold mode of ``task``'s expert and the calibration behind it (computed once, cached):
    ``{"mode", "modes": {mode: {success_last, success_any}}, "holds_success", ...}``. ``holds_success``
    is False where even the better mode ends fewer noise-free episodes in success than reach it (by more
    than ``HOLD_TOLERANCE``): there the task cannot hold success under this rule, and the data says so."""
    check_task(task)
    cache = cache or ArtifactCache()
    return _cached_calibration(cache, task, episode_length) or _store_calibration(
        cache, task, episode_length, _calibrate(task, episode_length))


def _units(task: str, settings: DataSettings, hold: str | None = None) -> list[tuple]:
    """Fixed work units for one task: episodes spread evenly over noise levels, cut into UNIT-sized pieces."""
    levels = settings.noise_levels
    per_level = [settings.episodes // len(levels) + (i < settings.episodes % len(levels)) for i in range(len(levels))]
    units = []
    for i, (noise, n) in enumerate(zip(levels, per_level)):
        for u, start in enumerate(range(0, n, UNIT)):
            units.append((task, noise, min(UNIT, n - start), _unit_seed(settings.seed, task, i, u),
                          settings.episode_length, hold))
    return units


def say(message: str) -> None:
    """Progress to the console, flushed (it often goes to a log file or a Ray worker's stream)."""
    print(message, flush=True)


def default_workers() -> int:
    """One generating process per core this process may use: every core of the host in the sweep's
    driver, the trial's own under Ray."""
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
    length = settings.episode_length
    workers = max(1, min(workers or default_workers(), len(missing) * (1 + settings.episodes // UNIT)))
    started = time.time()
    log(f"[rl-data] generating {len(missing)} task(s) x {settings.episodes} episodes with {workers} process(es)")

    holds: dict[str, str | None] = {t: None for t in missing}
    uncalibrated = []
    if settings.expert == "hold":
        for t in missing:
            found = _cached_calibration(cache, t, length)
            if found is None:
                uncalibrated.append(t)
            else:
                holds[t] = found["mode"]
    with progress(len(missing), "rl-data", unit="task") as bar:
        if workers == 1:
            for t in uncalibrated:
                holds[t] = _store_calibration(cache, t, length, _calibrate(t, length))["mode"]
            for t in missing:
                paths[t] = _store(cache, t, settings, [_run_unit(*u) for u in _units(t, settings, holds[t])], log,
                                  holds[t])
                bar.update(1)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                calibrations = {t: pool.submit(_calibrate, t, length) for t in uncalibrated}
                futures: dict[str, Any] = {}
                for t in missing:  # a task's units start as soon as its hold mode is known
                    if t in calibrations:
                        holds[t] = _store_calibration(cache, t, length, calibrations[t].result())["mode"]
                    futures[t] = [pool.submit(_run_unit, *u) for u in _units(t, settings, holds[t])]
                for t in missing:  # store each task as soon as its units finish: nothing finished is lost
                    paths[t] = _store(cache, t, settings, [f.result() for f in futures[t]], log, holds[t])
                    bar.update(1)
    log(f"[rl-data] done in {time.time() - started:.1f}s")
    return paths


def _store(cache: ArtifactCache, task: str, settings: DataSettings, parts: list[Episodes],
           log: Callable[[str], None], hold: str | None = None) -> Path:
    episodes = Episodes.concat(parts)

    def build(folder: Path) -> None:
        episodes.save(folder / FILE)

    art = cache.get_or_build(KIND, task, settings.key(task), build)
    s = episodes.summary()
    log(f"[rl-data] {task}: {s['episodes']} episodes, return mean {s['mean_return']:.0f} max {s['max_return']:.0f}, "
        f"success last-step {s['success_last']:.2f} any-step {s['success_any']:.2f}"
        + (f", hold {hold}" if hold else ""))
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


# --- the per-task data report (`python -m harness data rl --report`) -----------------------------------

REPORT_COLUMNS = ("task", "set", "noise", "episodes", "success_last", "success_any", "return_min", "return_mean",
                  "return_max", "hold", "holds_success", "expert")


def data_report(tasks: Sequence[str], settings: DataSettings, workers: int | None = None,
                cache: ArtifactCache | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per task and noise level of ``settings``' datasets (built first where missing): the expert's
    last-step and any-step success and its return range, with the task's hold mode and whether the
    noise-free expert holds success there (``holds_success``: its last-step success within
    ``HOLD_TOLERANCE`` of its any-step success)."""
    cache = cache or ArtifactCache()
    paths = build_datasets(list(tasks), settings, workers, cache, log)
    rows = []
    for task in tasks:
        calib = _cached_calibration(cache, task, settings.episode_length) if settings.expert == "hold" else None
        levels = Episodes.load(paths[task]).by_noise()
        # whether the noise-free expert holds success: judged on the data's own noise-free episodes where it
        # has some, else on the hold calibration's (both are small samples of the same expert)
        free = next((r for r in levels if r["noise"] == 0.0), None)
        holds = (free["success_last"] >= free["success_any"] - HOLD_TOLERANCE if free is not None
                 else calib["holds_success"] if calib is not None else "")
        for level in levels:
            rows.append({"task": task, "set": "CW10" if task in CW10 else "MT40", **level,
                         "hold": calib["mode"] if calib else "", "expert": settings.policy_id,
                         "holds_success": holds})
    noise_free = [r for r in rows if r["noise"] == 0.0]
    mean = {k: float(np.mean([r[k] for r in noise_free])) for k in ("success_last", "success_any")} if noise_free else {}
    return {"expert": settings.policy_id, "settings": settings.key("*"), "rows": rows,
            "noise_free_mean": mean,
            "not_holding": sorted(r["task"] for r in noise_free if r["success_last"] < r["success_any"] - HOLD_TOLERANCE)}


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``report`` as ``<out>/rl-data-report.json`` and ``.csv`` (one row per task and noise level)."""
    import csv
    import io
    import json

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS))
    writer.writeheader()
    for row in report["rows"]:
        writer.writerow({k: row.get(k, "") for k in REPORT_COLUMNS})
    paths = [out / "rl-data-report.json", out / "rl-data-report.csv"]
    atomic_write_text(paths[0], json.dumps(report, indent=1) + "\n")
    atomic_write_text(paths[1], buf.getvalue())
    return paths


def format_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table: a row per task, a column pair (last / any) per noise level."""
    levels = sorted({r["noise"] for r in report["rows"]})
    by_task: dict[str, dict[float, dict[str, Any]]] = {}
    for r in report["rows"]:
        by_task.setdefault(r["task"], {})[r["noise"]] = r
    head = ["task", "set", "hold"] + [f"noise {n:g} last/any" for n in levels] + ["return min/mean/max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, per in by_task.items():
        first = next(iter(per.values()))
        hold = (first["hold"] or "-") + ("" if first["holds_success"] in ("", True) else " (does not hold)")
        cells = [f"{per[n]['success_last']:.2f}/{per[n]['success_any']:.2f}" if n in per else "" for n in levels]
        rets = [x for p in per.values() for x in (p["return_min"], p["return_max"])]
        mean_ret = float(np.mean([p["return_mean"] for p in per.values()]))
        lines.append("| " + " | ".join([task, first["set"], hold, *cells,
                                        f"{min(rets):.0f}/{mean_ret:.0f}/{max(rets):.0f}"]) + " |")
    return "\n".join(lines)

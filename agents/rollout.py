"""Rollout evaluation: many Meta-World environments in worker processes, one batched DT forward per step.

Workers are started with the "spawn" context (safe next to torch's threads and inside Ray workers) and
import only the env code, never torch. Each worker hosts one or more environments; the parent sends a
whole step's actions at once and gets back observations, rewards and success flags. Workers are closed
on exit and terminated on error (``RolloutPool`` is a context manager).
"""

from __future__ import annotations

import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any, Sequence

import numpy as np

from harness.progress import progress
from agents.tasks import ACT_DIM, EPISODE_LENGTH, OBS_DIM, Expert, check_task, make_env

SCALE = 200.0  # the DT's return/reward token scale (agents.data.SCALE; kept here so workers skip numpy IO code)


def _worker(conn, task: str, seeds: list[int], length: int, hold: str | None = None) -> None:
    """Worker loop: owns ``len(seeds)`` envs of ``task``; answers reset / step / scripted / close.
    ``scripted`` steps every env with its own expert (``agents.tasks.Expert`` with ``hold``)."""
    import warnings

    warnings.simplefilter("ignore")
    envs = [make_env(task, seed=s, max_episode_steps=length) for s in seeds]
    experts = [Expert(task, env, hold) for env in envs]
    rng = np.random.default_rng(seeds[0] if seeds else 0)
    obs = np.zeros((len(envs), OBS_DIM), np.float32)
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "reset":
                for i, env in enumerate(envs):
                    obs[i] = env.reset()[0]
                    experts[i].reset()
                conn.send(obs.copy())
            elif cmd in ("step", "scripted"):
                if cmd == "scripted":  # arg: action noise std
                    actions = np.stack([x.act(o) for x, o in zip(experts, obs)]) + arg * rng.standard_normal((len(envs), ACT_DIM))
                    actions = np.clip(actions, -1, 1)
                else:
                    actions = arg
                rewards = np.zeros(len(envs), np.float32)
                success = np.zeros(len(envs), bool)
                for i, env in enumerate(envs):
                    o, r, _, _, info = env.step(np.asarray(actions[i], np.float32))
                    obs[i], rewards[i], success[i] = o, r, bool(info["success"])
                    experts[i].observe(o, success[i])
                conn.send((obs.copy(), rewards, success))
            elif cmd == "reseed":  # back to the first start states: the next resets repeat the first ones
                for env, s in zip(envs, seeds):
                    env.unwrapped.seed(s)
                conn.send(True)
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
    policy_s: float = 0.0  # time the main process spent choosing actions (the rest: simulators and pipes)
    start_s: float = 0.0  # from the call to the first step: workers spawned, simulators built and reset
    capture_s: float = 0.0  # CUDA-graph captures of the policy (with their warm-up forwards), inside start_s
    wait_s: float = 0.0  # time the main process waited for simulator steps that the policy did not hide

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}success": self.success, f"{prefix}success_any": self.success_any,
                f"{prefix}return": self.return_mean}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RolloutPool:
    """``n_envs`` environments of one task spread over ``workers`` spawned processes."""

    def __init__(self, task: str, n_envs: int, workers: int, seed: int = 0, length: int = EPISODE_LENGTH,
                 hold: str | None = None):
        check_task(task)
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.task, self.n_envs, self.length, self.seed = task, n_envs, length, seed
        workers = max(1, min(workers, n_envs))
        # Disjoint env seeds per evaluation seed: eval episodes never reuse one another's start states.
        seeds = [10_007 * seed + 1_000_003 + i for i in range(n_envs)]
        self.split = np.array_split(np.arange(n_envs), workers)
        ctx = get_context("spawn")
        self.conns, self.procs = [], []
        try:
            for part in self.split:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, task, [seeds[i] for i in part], length, hold), daemon=True)
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

    def reseed(self) -> None:
        """Re-seed every env, so that the following episodes start where the first ones did."""
        self._gather("reseed", [None] * len(self.conns))

    def groups(self, n: int) -> list[list[int]]:
        """The workers in ``n`` groups (fewer when there are fewer workers) of about equal env counts."""
        return [list(g) for g in np.array_split(np.arange(len(self.conns)), min(n, len(self.conns)))]

    def envs_of(self, workers: list[int]) -> np.ndarray:
        """The environment indices the given workers host, in order."""
        return np.concatenate([self.split[w] for w in workers])

    def send_step(self, workers: list[int], actions: np.ndarray) -> None:
        """Start a step on ``workers`` (actions for their envs, in ``envs_of`` order) without waiting."""
        at = 0
        for w in workers:
            n = len(self.split[w])
            self.conns[w].send(("step", actions[at:at + n]))
            at += n

    def recv_step(self, workers: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (observations, rewards, successes) of the step started by ``send_step`` on ``workers``."""
        parts = [self.conns[w].recv() for w in workers]
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


# the policy's inputs, packed side by side in one float32 array per step: name, width (timesteps and the
# padding mask travel as floats, exact for any episode length, and are converted inside the CUDA graph)
_FIELDS = (("states", OBS_DIM), ("actions", ACT_DIM), ("returns_to_go", 1), ("rewards", 1), ("timesteps", 1),
           ("mask", 1))
_COLUMNS = {name: slice(at - width, at) for (name, width), at in
            zip(_FIELDS, np.cumsum([width for _, width in _FIELDS]).tolist())}
_WIDTH = sum(width for _, width in _FIELDS)


class _Policy:
    """The DT's action for the newest step of every environment's window, one batched forward per step.

    The window is assembled on the host and crosses to the device as one packed copy from pinned memory;
    the actions come back as one copy. On CUDA each of the two forward shapes (with a padding mask in the
    first ``context - 1`` steps, without one after), unpacking and clamping included, is captured once as a
    CUDA graph and replayed: a rollout step costs three operations on the device (copy in, one graph launch,
    copy out). On a GPU that other processes keep busy, each operation waits for the GPU's time slice, so
    their count, not the forward, sets a step's time (BENCHMARKS.md, 2026-12-04). Where capture fails (a
    method whose forward syncs with the host), the forward runs eagerly.
    """

    def __init__(self, model, n: int, context: int, device):
        import torch

        self.model, self.device = model, device
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(n, context, _WIDTH, pin_memory=on_cuda)
        self.window = self.host.numpy()  # filled by the caller, field by field (see :data:`_COLUMNS`)
        self.packed = torch.zeros(n, context, _WIDTH, device=device) if on_cuda else self.host
        self.graphs: dict[bool, Any] = {}
        self.outputs: dict[bool, Any] = {}
        self.use_graphs = on_cuda
        self.capture_s = 0.0

    def prepare(self) -> None:
        """Capture both forward shapes now, with the first step's window in place (the values a lazy capture
        at step 0 would see), so a rollout can do it while its simulators are still starting."""
        if self.use_graphs:
            self.packed.copy_(self.host)
            for masked in (True, False):
                if self.use_graphs and masked not in self.graphs:
                    self._capture(masked)

    def _forward(self, masked: bool):
        import torch

        from harness.training import autocast  # heavy: harness.training imports torch

        c, p = _COLUMNS, self.packed
        inputs = {name: p[..., c[name]].contiguous() for name in ("states", "actions", "returns_to_go", "rewards")}
        inputs["timesteps"] = p[..., c["timesteps"].start].long()
        mask = p[..., c["mask"].start] > 0.5 if masked else None
        with torch.no_grad(), autocast(self.device):
            return self.model(**inputs, attention_mask=mask)[:, -1].float().clamp(-1, 1)

    def _capture(self, masked: bool) -> None:
        import torch

        started = time.perf_counter()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (cuBLAS workspaces, lazy inits)
                    self._forward(masked)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs[masked] = self._forward(masked)
            self.graphs[masked] = graph
        except Exception as e:  # noqa: BLE001 - any capture failure means the same: run eagerly
            import warnings

            warnings.warn(f"rollouts run without CUDA graphs ({type(e).__name__}: {e})", stacklevel=3)
            self.use_graphs = False
        finally:
            self.capture_s += time.perf_counter() - started

    def __call__(self, masked: bool) -> np.ndarray:
        """The actions (clamped to [-1, 1]) for the window the caller put in :attr:`window`."""
        if self.packed is not self.host:
            self.packed.copy_(self.host, non_blocking=True)  # pinned: the .cpu() below orders it
        if self.use_graphs and masked not in self.graphs:
            self._capture(masked)
        if self.use_graphs:
            self.graphs[masked].replay()
            return self.outputs[masked].cpu().numpy()
        return self._forward(masked).cpu().numpy()


class _Episodes:
    """The episodes of one group of environments so far, on the host, left-padded by ``context - 1`` empty
    steps so that each step's window is a slice."""

    def __init__(self, model, n: int, context: int, length: int, target_return: float | np.ndarray, device):
        P = context - 1
        self.K, self.P, self.T = context, P, length
        self.buf = {"states": np.zeros((n, P + length, OBS_DIM), np.float32),
                    "actions": np.zeros((n, P + length, ACT_DIM), np.float32),
                    "returns_to_go": np.zeros((n, P + length, 1), np.float32),
                    "rewards": np.zeros((n, P + length, 1), np.float32),
                    "timesteps": np.broadcast_to(np.arange(-P, length).clip(min=0)[:, None],
                                                 (n, P + length, 1)).astype(np.float32),
                    "mask": np.broadcast_to((np.arange(-P, length) >= 0)[:, None], (n, P + length, 1))
                    .astype(np.float32)}
        self.policy = _Policy(model, n, context, device)
        # one target for every env, or (with several tasks in one batch) an (n, 1) float32 array of targets
        self.target = target_return / (np.float32(SCALE) if isinstance(target_return, np.ndarray) else SCALE)

    def _fill(self, t: int) -> None:
        window = self.policy.window
        for name, columns in _COLUMNS.items():
            window[..., columns] = self.buf[name][:, t:t + self.K]

    def prepare(self) -> None:
        """Capture the policy's CUDA graphs (see :meth:`_Policy.prepare`) before the first step."""
        self._fill(0)
        self.policy.prepare()

    def start(self, obs: np.ndarray) -> None:
        self.buf["states"][:, self.P] = obs
        self.buf["returns_to_go"][:, self.P] = self.target

    def act(self, t: int) -> np.ndarray:
        """The actions of step ``t`` (the one host sync of a step)."""
        self._fill(t)
        act = self.policy(t < self.P)
        self.buf["actions"][:, self.P + t] = act
        return act

    def observe(self, t: int, obs: np.ndarray, rewards: np.ndarray) -> None:
        P = self.P
        r = rewards[:, None] / SCALE
        self.buf["rewards"][:, P + t] = r
        if t + 1 < self.T:
            self.buf["states"][:, P + t + 1] = obs
            self.buf["returns_to_go"][:, P + t + 1] = self.buf["returns_to_go"][:, P + t] - r


def evaluate_dt(model, task: str, episodes: int, target_return: float, workers: int = 1, seed: int = 0,
                device=None, length: int = EPISODE_LENGTH, pool: RolloutPool | None = None,
                groups: int = 2) -> RolloutResult:
    """Roll out the DT on ``episodes`` parallel environments of ``task``.

    ``pool``: workers already running for these episodes (:class:`TrialRollouts`), re-seeded here so that
    the episodes are those of a fresh pool; None: a pool is spawned for this call and closed after it.

    ``target_return`` is unscaled (the dataset's best return); the return-to-go token starts at it and
    drops by each observed reward; the current step's reward token is 0 until observed. With ``groups=2``
    and two or more workers the environments run in two groups, one group's simulator steps overlapping the
    other's DT forward, so the policy's time hides behind the simulator's; ``groups=1``: one forward for all
    of them a step (half the device calls, for a GPU that other processes keep busy). The episodes are the
    same either way.
    """
    import torch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    K = int(getattr(getattr(model, "cfg", None), "context", 0) or _find_cfg(model).context)
    N, T = episodes, length
    # refused before the model leaves its mode or a worker starts
    if groups not in (1, 2):
        raise ValueError(f"groups must be 1 or 2, not {groups!r}")
    if pool is not None and (pool.task, pool.n_envs, pool.length, pool.seed) != (task, N, T, seed):
        raise ValueError(f"the rollout pool runs {pool.n_envs} episodes of {pool.task!r} (length {pool.length}, "
                         f"seed {pool.seed}); this evaluation asks for {N} of {task!r} (length {T}, seed {seed})")
    rewards = np.zeros((N, T), np.float32)
    successes = np.zeros((N, T), bool)
    was_training = model.training
    model.eval()
    t0 = time.time()
    try:
        with (RolloutPool(task, N, workers, seed, length) if pool is None else nullcontext(pool)) as pool, \
                progress(T, f"rollout {task}", unit="step") as bar:
            parts = pool.groups(groups)
            envs = [pool.envs_of(g) for g in parts]
            eps = [_Episodes(model, len(e), K, T, target_return, device) for e in envs]
            for e in eps:  # while the spawned workers import their simulators
                e.prepare()
            pool.reseed()  # a pool kept from an earlier evaluation starts its episodes where they first started
            obs = pool.reset()
            for e, idx in zip(eps, envs):
                e.start(obs[idx])
            start_s = time.time() - t0
            policy_s = wait_s = 0.0
            for t in range(T):
                for g, (e, idx) in enumerate(zip(eps, envs)):
                    if t > 0:  # the group's previous step ran while the other group's policy did
                        waited = time.perf_counter()
                        o, r, s = pool.recv_step(parts[g])
                        wait_s += time.perf_counter() - waited
                        rewards[idx, t - 1], successes[idx, t - 1] = r, s
                        e.observe(t - 1, o, r)
                    started = time.perf_counter()
                    actions = e.act(t)
                    policy_s += time.perf_counter() - started
                    pool.send_step(parts[g], actions)
                bar.update(1)
            for g, (e, idx) in enumerate(zip(eps, envs)):
                waited = time.perf_counter()
                o, r, s = pool.recv_step(parts[g])
                wait_s += time.perf_counter() - waited
                rewards[idx, T - 1], successes[idx, T - 1] = r, s
    finally:
        model.train(was_training)
    result = _score(task, rewards, successes, time.time() - t0, target_return)
    result.policy_s, result.start_s, result.wait_s = policy_s, start_s, wait_s
    result.capture_s = sum(e.policy.capture_s for e in eps)
    return result


class TrialRollouts:
    """The evaluation rollouts of one trial on one pool of workers: spawned once, at :meth:`start` (a
    track calls it when it sets the trial up, so the simulators start while the trial builds, compiles
    and trains), and re-seeded before every evaluation, so each scores the episodes a fresh
    :func:`evaluate_dt` with ``seed`` scores. A scheduler's rung evaluations and the final one then pay no
    process start-up each. A failed evaluation closes the pool (its pipes may hold answers nobody read);
    the next one spawns a new one. Closed by :meth:`close` (the engine calls it when the trial ends) or
    when the object is collected."""

    def __init__(self, task: str, episodes: int, workers: int, seed: int = 0, length: int = EPISODE_LENGTH,
                 groups: int = 2):
        check_task(task)
        self.task, self.episodes, self.workers, self.seed, self.length = task, episodes, workers, seed, length
        self.groups = groups
        self._pool: RolloutPool | None = None
        self._finalizer: weakref.finalize | None = None

    def start(self) -> None:
        """Spawn the workers (they import and build their simulators in the background) unless running."""
        if self._pool is None:
            self._pool = RolloutPool(self.task, self.episodes, self.workers, self.seed, self.length)
            self._finalizer = weakref.finalize(self, self._pool.close, True)

    def evaluate(self, model, target_return: float, device=None) -> RolloutResult:
        """:func:`evaluate_dt` on this trial's pool."""
        self.start()
        try:
            return evaluate_dt(model, self.task, self.episodes, target_return, self.workers, self.seed, device,
                               self.length, pool=self._pool, groups=self.groups)
        except BaseException:
            self.close(force=True)
            raise

    @property
    def worker_pids(self) -> list[int]:
        """The running workers' process ids (none before :meth:`start` or after :meth:`close`)."""
        return [p.pid for p in self._pool.procs] if self._pool is not None else []

    def close(self, force: bool = False) -> None:
        if self._pool is not None:
            self._pool.close(force)
            self._pool = None
            self._finalizer.detach()

    def __enter__(self) -> "TrialRollouts":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(force=exc_type is not None)


def _find_cfg(model):
    for m in model.modules():
        if hasattr(m, "cfg") and hasattr(m.cfg, "context"):
            return m.cfg
    raise ValueError("cannot find the DT config (context length) in the model")


def evaluate_scripted(task: str, episodes: int, workers: int = 1, seed: int = 0, noise: float = 0.0,
                      length: int = EPISODE_LENGTH, hold: str | None = None) -> RolloutResult:
    """The expert (``agents.tasks.Expert`` with ``hold``; None: metaworld's scripted policy as shipped) on
    the same episodes as :func:`evaluate_dt` with the same ``seed`` (same start states), acting inside the
    workers: the task's data ceiling, and a reference for speed."""
    rewards = np.zeros((episodes, length), np.float32)
    successes = np.zeros((episodes, length), bool)
    t0 = time.time()
    with RolloutPool(task, episodes, workers, seed, length, hold) as pool:
        pool.reset()
        start_s = time.time() - t0
        for t in range(length):
            _, rewards[:, t], successes[:, t] = pool.step_scripted(noise)
    result = _score(task, rewards, successes, time.time() - t0, 0.0)
    result.start_s = start_s
    return result


class TaskPools:
    """Rollout workers for several tasks at once (one :class:`RolloutPool` per task, ``episodes`` envs
    each), kept alive across evaluations: a pretraining that scores MT40 at several update counts spawns
    its simulators once. Env seeds are those of :class:`RolloutPool` with ``seed``, so each task's
    episodes are the ones :func:`evaluate_dt` with that seed scores."""

    def __init__(self, tasks: Sequence[str], episodes: int, workers: int, seed: int = 0,
                 length: int = EPISODE_LENGTH):
        self.tasks, self.episodes, self.length = list(tasks), int(episodes), length
        per_task = max(1, workers // max(1, len(self.tasks)))
        self.pools: list[RolloutPool] = []
        try:
            for t in self.tasks:
                self.pools.append(RolloutPool(t, self.episodes, per_task, seed, length))
        except BaseException:
            self.close(force=True)
            raise

    def close(self, force: bool = False) -> None:
        for p in self.pools:
            p.close(force)
        self.pools = []

    def __enter__(self) -> "TaskPools":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(force=exc_type is not None)


def evaluate_dt_tasks(model, pools: TaskPools, targets: dict[str, float], device=None) -> dict[str, RolloutResult]:
    """Roll out the DT on every task of ``pools`` at once: one batched forward per step over all their
    environments (each with its own task's target return), the simulators of one half of the tasks
    stepping while the policy acts for the other half. Per task, the same scores :func:`evaluate_dt` gives."""
    import torch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    K = int(getattr(getattr(model, "cfg", None), "context", 0) or _find_cfg(model).context)
    T, E = pools.length, pools.episodes
    tasks = pools.tasks
    rewards = {t: np.zeros((E, T), np.float32) for t in tasks}
    successes = {t: np.zeros((E, T), bool) for t in tasks}
    was_training = model.training
    model.eval()
    t0 = time.time()
    halves = [list(h) for h in np.array_split(np.arange(len(tasks)), min(2, len(tasks)))]
    try:
        eps = []
        for half in halves:
            target = np.array([[targets[tasks[i]]] for i in half for _ in range(E)], np.float32)
            eps.append(_Episodes(model, len(half) * E, K, T, target, device))
        for e, half in zip(eps, halves):  # re-seeded: every evaluation scores the same start states
            for i in half:
                pools.pools[i].reseed()
            e.start(np.concatenate([pools.pools[i].reset() for i in half]))
        for t in range(T):
            for e, half in zip(eps, halves):
                if t > 0:
                    o, r = _recv_half(pools, half, tasks, rewards, successes, t - 1)
                    e.observe(t - 1, o, r)
                actions = e.act(t)
                for j, i in enumerate(half):
                    pools.pools[i].send_step(list(range(len(pools.pools[i].conns))), actions[j * E:(j + 1) * E])
        for half in halves:
            _recv_half(pools, half, tasks, rewards, successes, T - 1)
    finally:
        model.train(was_training)
    wall = time.time() - t0
    return {t: _score(t, rewards[t], successes[t], wall, targets[t]) for t in tasks}


def _recv_half(pools: TaskPools, half: list[int], tasks: list[str], rewards, successes, t: int):
    obs, rew = [], []
    for i in half:
        pool = pools.pools[i]
        o, r, s = pool.recv_step(list(range(len(pool.conns))))
        rewards[tasks[i]][:, t], successes[tasks[i]][:, t] = r, s
        obs.append(o)
        rew.append(r)
    return np.concatenate(obs), np.concatenate(rew)

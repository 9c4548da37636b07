"""Where a process runs: its device and its share of the host's cores, under Ray Tune or alone.

Under Ray Tune a trial holds a slice of one node: ``cpus_per_trial`` cores and ``gpus_per_trial`` of a
GPU. Ray says which GPU through ``CUDA_VISIBLE_DEVICES`` (so torch numbers the trial's GPU 0), or, when
``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` is set, only through ``ray.get_gpu_ids()``, the physical
indices. A trial must use the GPU Ray gave it and nothing else, and must size its worker pools (rollout
processes, data generation) to its cores, not the host's: eight GPUs' worth of trials each spawning a
process per host core would ask for the host's cores many times over. Outside Ray the process has every
core its affinity mask allows and every visible GPU.

The sweep's side of it lives here too, where the driver and the planner (``harness/plan.py``) both read
it: the share of a GPU a wave's trials get under ``gpus_per_trial: auto`` (:func:`auto_gpu_share`) and
whether an explicit cluster address answers (:func:`check_reachable`).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from harness.errors import ConfigError

if TYPE_CHECKING:
    import torch

NOSET_VAR = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class RaySlice:
    """What Ray assigned to the current worker: cores, GPU share and the physical GPU ids."""

    cpus: float
    gpus: float
    gpu_ids: tuple[str, ...]


def ray_slice() -> RaySlice | None:
    """The current Ray worker's assigned resources, or None outside a Ray worker (the driver included)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:  # the driver holds no slice: it may use the whole machine
        return None
    assigned = ctx.get_assigned_resources()
    return RaySlice(cpus=float(assigned.get("CPU", 0.0)), gpus=float(assigned.get("GPU", 0.0)),
                    gpu_ids=tuple(str(i) for i in ray.get_gpu_ids()))


def host_cpus() -> int:
    """The cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def visible_gpus() -> int:
    """The CUDA GPUs this process sees (``CUDA_VISIBLE_DEVICES`` applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def usable_cpus() -> int:
    """This process's share of cores: the trial's ``cpus_per_trial`` under Ray (at least 1), else the host's.

    Worker pools (rollouts, data generation) size themselves by this, so trials side by side never ask
    for more processes than the node has cores."""
    s = ray_slice()
    if s is not None and s.cpus > 0:
        return max(1, min(int(s.cpus), host_cpus()))
    return host_cpus()


def resolve_device(requested: str, cuda_count: int, visible: str | None, ray: RaySlice | None,
                   noset: bool = False) -> str:
    """The torch device a trial must use (``cpu``, ``cuda`` or ``cuda:N``), or a ConfigError saying why not.

    ``requested``: the track's ``device`` setting (auto, cpu, cuda, cuda:N). ``cuda_count``: GPUs torch
    sees. ``visible``: ``CUDA_VISIBLE_DEVICES`` (None when unset). ``ray``: the Ray slice (None outside a
    Ray worker). ``noset``: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone, so the trial's GPU is found by its
    physical id. Pure, so every case is testable without a GPU.
    """
    shown = "unset" if visible is None else repr(visible)
    if requested == "cpu":
        return "cpu"
    if ray is not None and ray.gpus <= 0:
        if requested == "auto":  # the trial holds no GPU: using one would take another trial's share
            return "cpu"
        raise ConfigError(f"device={requested!r}, but this Ray trial holds no GPU (gpus_per_trial 0): set "
                          "resources.gpus_per_trial above 0, or device auto or cpu")
    if ray is not None and ray.gpu_ids and (noset or visible is None):
        # Ray left CUDA_VISIBLE_DEVICES as the node had it: find the trial's GPU among the visible ones
        listed = [v.strip() for v in visible.split(",")] if visible else None
        if listed is not None and ray.gpu_ids[0] not in listed:
            raise ConfigError(f"Ray placed this trial on GPU {ray.gpu_ids[0]}, which CUDA_VISIBLE_DEVICES {shown} "
                              "hides: unset RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES, or make the GPU visible")
        index = listed.index(ray.gpu_ids[0]) if listed is not None else int(ray.gpu_ids[0])
        if requested.startswith("cuda:") and int(requested[5:]) != index:
            raise ConfigError(f"device={requested!r}, but Ray placed this trial on GPU {index}: use device auto "
                              "or cuda under a sweep (Ray places trials)")
        return f"cuda:{index}"
    if requested == "auto":
        return "cuda" if cuda_count > 0 else "cpu"
    if cuda_count == 0:
        raise ConfigError(f"device={requested!r}, but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES {shown}): use "
                          "device auto or cpu, or run where a GPU is")
    if requested.startswith("cuda:") and int(requested[5:]) >= cuda_count:
        raise ConfigError(f"device={requested!r}, but only {cuda_count} GPU(s) are visible (CUDA_VISIBLE_DEVICES "
                          f"{shown}; numbered 0..{cuda_count - 1} in this process): use one of "
                          f"{', '.join(f'cuda:{i}' for i in range(cuda_count))}, or auto")
    return requested


def trial_device(requested: str = "auto") -> "torch.device":
    """The torch device for this process (see :func:`resolve_device`); made the current CUDA device, so
    peak-memory counters and bare ``cuda`` tensors land on the trial's own GPU."""
    import torch

    name = resolve_device(requested, visible_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"), ray_slice(),
                          bool(os.environ.get(NOSET_VAR)))
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    return device


def describe(device: Any) -> dict[str, Any]:
    """Where this process ran, for a trial's record: device, ``CUDA_VISIBLE_DEVICES``, Ray's slice."""
    s = ray_slice()
    return {"device": str(device), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cpus": usable_cpus(), "ray": asdict(s) if s is not None else None, "host": os.uname().nodename}


__all__ = ["RaySlice", "describe", "host_cpus", "ray_slice", "resolve_device", "trial_device", "usable_cpus",
           "visible_gpus"]


MOST_TRIALS_PER_GPU = 4  # past four, trials sharing a GPU add no throughput (BENCHMARKS.md, bench share)


def auto_gpu_share(n_trials: int, gpus: float) -> float:
    """``gpus_per_trial: auto`` for a wave of ``n_trials`` on a cluster of ``gpus`` GPUs: the largest share
    that still runs every trial at once, at most four trials per GPU (0 without GPUs).

    Ray packs fractional requests onto one GPU before it opens the next, so a fixed quarter would put a
    wave of six trials on two of eight GPUs and leave six idle; a share of 1 / ceil(trials / GPUs) spreads
    them, and a wave larger than the cluster still gets four trials per GPU."""
    if gpus <= 0 or n_trials <= 0:
        return 0.0
    per_gpu = min(MOST_TRIALS_PER_GPU, math.ceil(n_trials / gpus))
    return 1.0 / per_gpu


# "auto" of resources.start_stagger_s: on the H200's ``bench scale``, a routed trial's evaluation, save and
# the next trial's set-up left its share of the GPU unused for ~6.7 s (BENCHMARKS.md, 2026-12-03 seventh session);
# measured against starting together on a warm cache it changed nothing (2026-12-04), so it is not the default
AUTO_START_STAGGER_S = 8.0


def start_delays(keys: Sequence[str], gpu_share: float, gpus: float, max_concurrent: int | None,
                 stagger_s: float | str = 0.0) -> dict[str, float]:
    """Seconds the first trials of a wave wait before they begin, by key, ``keys`` in the order Tune starts
    the trials: on each GPU the first trial starts at once, the next ``stagger_s`` later, and so on (Ray
    fills one GPU's shares before the next, :func:`auto_gpu_share`). Empty where trials do not share a GPU
    (``gpu_share`` 0 or 1 and more) or ``stagger_s`` is 0.

    Trials of equal length that start together stay in step (under ``harness.trial_routing`` each process
    runs one structure, so they do): they all evaluate and save at once and the GPU waits for them. Started
    apart, one trial's evaluation falls while the others train. A process waits only before its first
    trial, so the cost is paid once per wave."""
    stagger = AUTO_START_STAGGER_S if stagger_s == "auto" else float(stagger_s)
    if not 0 < gpu_share < 1 or gpus <= 0 or stagger <= 0:
        return {}
    per_gpu = max(1, round(1 / gpu_share))
    slots = min(len(keys), int(gpus / gpu_share + 1e-9), max_concurrent or len(keys))
    return {key: (i % per_gpu) * stagger for i, key in enumerate(keys[:slots]) if i % per_gpu}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """An explicit ``host:port`` (or ``ray://host:port``) must answer within seconds; Ray itself would
    retry for minutes. ``auto`` is left to Ray, which finds a local cluster or fails at once."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--address {address!r}: nothing answers there ({e.strerror or e}). Start the cluster "
                          "first (`ray start --head` on the head node), check the host and port, or leave out "
                          "--address to run on this machine alone") from None

"""Where a process runs: its device and its share of the host's cores, under Ray Tune or alone.

Under Ray Tune a trial holds a slice of one node: ``cpus_per_trial`` cores and ``gpus_per_trial`` of a
GPU. Ray says which GPU through ``CUDA_VISIBLE_DEVICES`` (so torch numbers the trial's GPU 0), or, when
``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` is set, only through ``ray.get_gpu_ids()``, the physical
indices. A trial must use the GPU Ray gave it and nothing else, and must size its worker pools (rollout
processes, data generation) to its cores, not the host's: eight GPUs' worth of trials each spawning a
process per host core would ask for the host's cores many times over. Outside Ray the process has every
core its affinity mask allows and every visible GPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

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

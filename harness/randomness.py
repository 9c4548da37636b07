"""Per-trial randomness: each trial owns its random streams, so trials can share a process.

Code the harness writes draws from explicit generators (:meth:`TrialRandom.generator`,
:meth:`TrialRandom.numpy`). Code it does not write (dropout, timm's DropPath and weight init, peft's
adapter init) draws from torch's global generator; :meth:`TrialRandom.scope` swaps the trial's own state
of that generator in while the trial runs and out again afterwards, so a trial's draws do not depend on
what other trials in the same process did in between.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from typing import Iterator

import numpy as np
import torch


def derive_seed(seed: int, stream: str) -> int:
    """A seed for the named stream of a trial: independent streams, reproducible from (seed, stream)."""
    return (int(seed) * 1_000_003 + zlib.crc32(stream.encode())) % (2**63 - 1)


class TrialRandom:
    """The random state of one trial (or one pretraining run)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._cpu_state = torch.Generator().manual_seed(self.seed).get_state()
        self._cuda_state: torch.Tensor | None = None

    def generator(self, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh torch generator for the named stream (e.g. "batches", "eva-init")."""
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, stream))

    def numpy(self, stream: str) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self.seed, stream))

    @contextlib.contextmanager
    def scope(self) -> Iterator["TrialRandom"]:
        """Run a block with torch's global generators set to this trial's state, then put them back."""
        outer_cpu = torch.get_rng_state()
        torch.set_rng_state(self._cpu_state)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        outer_cuda = torch.cuda.get_rng_state() if cuda else None
        if cuda:
            if self._cuda_state is None:
                torch.cuda.manual_seed(self.seed)
            else:
                torch.cuda.set_rng_state(self._cuda_state)
        try:
            yield self
        finally:
            self._cpu_state = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._cuda_state = torch.cuda.get_rng_state()
                if outer_cuda is not None:
                    torch.cuda.set_rng_state(outer_cuda)


def seeded(seed: int) -> contextlib.AbstractContextManager:
    """A block whose global torch draws start from ``seed`` and leave the process's state as it was."""
    return TrialRandom(seed).scope()


def deterministic_kernels() -> None:
    """Make torch pick deterministic kernels in this process (``deterministic: true`` in a track's settings).

    Atomic-add reductions (an embedding's backward, some attention backwards) sum in whatever order the
    threads arrive, so two runs of a GPU trial can differ in the last bits and then drift apart. cuBLAS
    needs a fixed workspace for the same guarantee, read when its first handle is made. Ops without a
    deterministic kernel warn instead of failing (``warn_only``), so the trial runs and the log names them.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def deterministic_kernels_within(on: bool = True) -> Iterator[None]:
    """:func:`deterministic_kernels` for one block (``on``), the process's own choice restored after it: the
    driver pretrains a study's base under the study's ``deterministic`` and then goes on with other work."""
    if not on:
        yield
        return
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.benchmark)
    deterministic_kernels()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.backends.cudnn.benchmark = was[2]

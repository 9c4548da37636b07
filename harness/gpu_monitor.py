"""GPU utilisation and memory over a run, per GPU, sampled by ``nvidia-smi`` (the benches' eyes on the GPU).

Utilisation is nvidia-smi's ``utilization.gpu``: the percent of the sample period in which a kernel ran.
It says how much idle time trials leave, not how well each kernel uses the chip. On a machine without
``nvidia-smi`` the monitor records nothing and every summary is None.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSample:
    time: float  # when the line arrived (time.time())
    index: int  # nvidia-smi's index, the host's numbering (not CUDA_VISIBLE_DEVICES')
    utilisation_pct: float
    memory_used_mib: float


def parse_line(line: str, received: float) -> GpuSample | None:
    """One ``index, utilization.gpu, memory.used`` CSV line, or None for anything else ([N/A], headers)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        return GpuSample(received, int(parts[0]), float(parts[1]), float(parts[2]))
    except ValueError:
        return None


class GpuMonitor:
    """Samples every GPU nvidia-smi lists, every ``period_ms``, while the ``with`` block runs."""

    def __init__(self, period_ms: int = 200) -> None:
        self.period_ms = period_ms
        self.samples: list[GpuSample] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuMonitor":
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", str(self.period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            sample = parse_line(line, time.time())
            if sample is not None:
                self.samples.append(sample)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def per_gpu(self, start: float, end: float) -> dict[int, dict[str, float]]:
        """Each GPU's mean utilisation (%) and peak memory used (MiB) between ``start`` and ``end``."""
        out: dict[int, dict[str, float]] = {}
        for index in sorted({s.index for s in self.samples}):
            picked = [s for s in self.samples if s.index == index and start <= s.time <= end]
            if picked:
                out[index] = {"utilisation_pct": round(sum(s.utilisation_pct for s in picked) / len(picked), 1),
                              "peak_memory_used_mib": max(s.memory_used_mib for s in picked)}
        return out

    def mean_between(self, start: float, end: float, gpus: list[int] | None = None) -> float | None:
        """Mean utilisation (%) over the given GPUs (every one sampled when None) between the times."""
        rows = self.per_gpu(start, end)
        picked = [v["utilisation_pct"] for i, v in rows.items() if gpus is None or i in gpus]
        return round(sum(picked) / len(picked), 1) if picked else None


__all__ = ["GpuMonitor", "GpuSample", "parse_line"]

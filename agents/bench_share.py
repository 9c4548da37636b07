"""``python -m harness bench share``: N fine-tuning trials of the paper DT sharing one GPU through Ray Tune.

Each count N of ``trials`` is one Tune run of N trials, each holding ``1/N`` of the GPU (the sweep's
fractional ``gpus_per_trial``), every trial the engine's update loop of ``bench rl`` on the paper DT. The
trials compile and warm up, wait at a barrier until all N are ready, then time ``steps`` updates; the
aggregate rate is every trial's updates over the span from the first timed start to the last end, and
the figure of merit is the aggregate over N = 1's rate. The GPU's utilisation is sampled meanwhile
(``nvidia-smi``), which says how much idle time a single trial leaves for others to fill.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.gpu_monitor import GpuMonitor
from harness.validation import Bool, CompileMode, Float, Int, validate


class ShareSettings(BaseModel):
    """``--set`` keys of ``bench share``."""

    model_config = ConfigDict(extra="forbid")
    trials: list[Int] = Field(default_factory=lambda: [1, 4, 8], min_length=1)  # trial counts, one Tune run each
    steps: Int = Field(300, ge=5)  # timed updates per trial, after the warm-up
    warmup: Int = Field(30, ge=1)  # untimed updates (compilation) before the barrier
    compile: Bool = True
    # torch.compile's mode: reduce-overhead replays CUDA graphs, as bench scale's and the sweeps' graph runs do;
    # four trials at once in that mode are the yardstick bench scale's aggregate is set against (issue 20)
    compile_mode: CompileMode = "default"
    batch_size: Int = Field(128, ge=1)
    cpus_per_trial: Float = Field(1.0, gt=0)
    # the DT shape (the paper's by default; the tests use a small one)
    n_layer: Int = Field(4, ge=1)
    n_embd: Int = Field(512, ge=8)
    n_head: Int = Field(8, ge=1)
    barrier_timeout_s: Float = Field(600.0, gt=0)

    @field_validator("trials")
    @classmethod
    def _positive(cls, counts: list[int]) -> list[int]:
        if any(n < 1 for n in counts):
            raise ValueError(f"trial counts must be >= 1, got {counts}")
        return counts


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: warm up, meet the others at the barrier, time the updates, report."""
    import torch
    from ray import tune

    from agents.bench import finetune_trainer  # heavy: agents.bench imports metaworld
    from agents.dt import DTConfig  # heavy: agents.dt imports metaworld
    from agents.track import RLSettings  # heavy: agents.track imports metaworld
    from harness.training import synchronize  # heavy: harness.training imports torch

    s = ShareSettings(**config["settings"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DTConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)
    trainer = finetune_trainer(cfg, RLSettings(), s.batch_size, s.warmup + s.steps, s.compile, device,
                               mode=s.compile_mode)
    for _ in range(s.warmup):
        trainer.step()
    synchronize(device)
    barrier = Path(config["barrier"])
    (barrier / f"ready-{config['index']}").touch()
    deadline = time.monotonic() + s.barrier_timeout_s
    while len(list(barrier.glob("ready-*"))) < config["n"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench share: only {len(list(barrier.glob('ready-*')))} of {config['n']} trials "
                               f"were ready after {s.barrier_timeout_s} s (raise barrier_timeout_s or cpus)")
        time.sleep(0.05)
    start = time.time()
    while trainer.step():
        pass
    synchronize(device)
    end = time.time()
    trainer.finish()
    tune.report({"start": start, "end": end, "updates": s.steps, "updates_per_s": s.steps / (end - start)})


def _run(n: int, s: ShareSettings, gpus: int) -> dict[str, Any]:
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        barrier = Path(tmp) / "barrier"
        barrier.mkdir()
        resources = {"cpu": s.cpus_per_trial, "gpu": 1.0 / n if gpus else 0}
        tuner = tune.Tuner(
            tune.with_resources(_trial, resources),
            param_space={"index": tune.grid_search(list(range(n))), "n": n, "barrier": str(barrier),
                         "settings": s.model_dump()},
            tune_config=tune.TuneConfig(metric="updates_per_s", mode="max", max_concurrent_trials=n),
            run_config=tune.RunConfig(name=f"share-{n}", storage_path=str(Path(tmp) / "ray"), verbose=0))
        with GpuMonitor() as util:
            results = tuner.fit()
        errors = [str(r.error) for r in results if r.error]
        if errors:
            raise RuntimeError(f"bench share: {len(errors)} of {n} trials failed: {errors[0]}")
        rows = [r.metrics for r in results]
    start, end = min(r["start"] for r in rows), max(r["end"] for r in rows)
    total = sum(r["updates"] for r in rows)
    return {"trials": n, "gpu_per_trial": resources["gpu"], "aggregate_updates_per_s": round(total / (end - start), 2),
            "per_trial_updates_per_s": sorted(round(r["updates_per_s"], 2) for r in rows),
            "span_s": round(end - start, 2), "gpu_utilisation_pct": util.mean_between(start, end)}


def bench_share(overrides: dict[str, Any]) -> dict[str, Any]:
    """Aggregate updates/s of N trials sharing the GPU, for each N in ``trials``, and the ratio to N = 1."""
    import ray
    import torch

    s = validate(ShareSettings, overrides, "bench share", "bench setting")
    counts = sorted(set(s.trials) | {1})
    gpus = torch.cuda.device_count()
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    try:
        runs = []
        for n in counts:
            runs.append(_run(n, s, gpus))
            print(f"[bench share] {n} trial(s): {runs[-1]['aggregate_updates_per_s']} updates/s together, "
                  f"GPU utilisation {runs[-1]['gpu_utilisation_pct']}%", flush=True)
    finally:
        ray.shutdown()
    alone = runs[0]["aggregate_updates_per_s"]
    for r in runs:
        r["aggregate_over_alone"] = round(r["aggregate_updates_per_s"] / alone, 3)
    return {"device": torch.cuda.get_device_name() if gpus else "cpu", "settings": s.model_dump(), "runs": runs}

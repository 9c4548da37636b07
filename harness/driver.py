"""The Ray Tune driver: one Tune experiment per wave of trials, resumable, CPU-only or fractional GPUs.

A study runs in waves: with the select-then-final protocol, first the selection grid (training split ->
validation), then the final runs of the chosen settings (train+val -> test); within a stage, methods
that build on other trials' adapters (EigenLoRA) run in a second wave after the rest. Each wave is a
Tune experiment under ``<results>/<sweep>/<study>-<stage>[-bank]``; ``--resume`` restores an interrupted
one with ``Tuner.restore`` (finished trials are kept, not rerun) and skips finished ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.cache import atomic_write_text, cache_root
from harness.errors import ConfigError
from harness.sweep_file import Study, SweepFile, study_tasks, study_trials
from harness.trial import TrialSpec, print_reporter, run_trial, track_module


def _trainable(config: dict[str, Any]) -> None:
    """The Tune function trainable: one harness trial, progress and the final record reported to Tune."""
    import torch
    from ray import tune

    os.environ["HARNESS_CACHE"] = config["cache_root"]
    torch.set_num_threads(max(1, int(config["cpus"])))
    spec = TrialSpec(**config["spec"])

    def report(metrics: dict[str, Any]) -> None:
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})

    record = run_trial(spec, report)
    flat = record.flat()
    final = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update(status=record.status, record=json.dumps(flat, default=str))
    tune.report(final)


def _trial_name(trial) -> str:
    spec = trial.config["spec"]
    settings = "-".join(f"{k}{v}" for k, v in sorted(spec["method_settings"].items()))
    return f"{spec['task']}_{spec['method']}{('_' + settings) if settings else ''}_s{spec['seed']}"[:80]


def _trial_dir(trial) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


def init_ray(address: str | None, dashboard: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = dashboard
        if dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
    ctx = ray.init(**kwargs)
    url = getattr(ctx, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}", flush=True)


def _gpus_per_trial(study: Study) -> float:
    import ray

    if study.resources.gpus_per_trial != "auto":
        return float(study.resources.gpus_per_trial)
    return 0.25 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def run_wave(specs: list[TrialSpec], study: Study, exp_dir: Path, resume: bool) -> list[dict[str, Any]]:
    """Run (or resume) one Tune experiment over ``specs``; return the flat trial records."""
    from ray import tune

    if not specs:
        return []
    trainable = tune.with_resources(_trainable, {"cpu": study.resources.cpus_per_trial,
                                                 "gpu": _gpus_per_trial(study)})
    exists = (exp_dir / "tuner.pkl").exists()
    if exists and not resume:
        raise ConfigError(f"results of this sweep already exist in {exp_dir}: pass --resume to continue "
                          "(finished trials are kept), or --results DIR for a fresh folder")
    if exists and tune.Tuner.can_restore(str(exp_dir)):
        print(f"[sweep] resuming {exp_dir}", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        param_space = {"spec": tune.grid_search([asdict(s) for s in specs]), "cache_root": str(cache_root()),
                       "cpus": study.resources.cpus_per_trial}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=study.resources.max_concurrent,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dir),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent.resolve()),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
    grid = tuner.fit()
    records = []
    for result in grid:
        metrics = result.metrics or {}
        if "record" in metrics:
            records.append(json.loads(metrics["record"]))
        else:  # the trial process itself died (not a Python error inside the trial)
            spec = result.config["spec"]
            records.append({"track": spec["track"], "benchmark": spec["benchmark"], "task": spec["task"],
                            "method": spec["method"], "settings": json.dumps(spec["method_settings"], sort_keys=True),
                            "seed": spec["seed"], "status": "failed",
                            "error": f"trial did not finish: {result.error!r}" if result.error else "trial did not finish",
                            "budget": json.dumps(spec["budget"], sort_keys=True)})
    return records


def choose_settings(records: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (method, task), the settings with the best mean ``metric`` over seeds (failed trials skipped)."""
    import pandas as pd

    ok = [r for r in records if r.get("status") == "ok" and r.get(metric) is not None]
    if not ok:
        return {}
    df = pd.DataFrame(ok)
    means = df.groupby(["method", "task", "settings"])[metric].mean().reset_index()
    best = means.sort_values(metric, ascending=False).drop_duplicates(["method", "task"])
    return {(r.method, r.task): json.loads(r.settings) for r in best.itertuples()}


def run_study(sweep: SweepFile, study: Study, results_dir: Path, resume: bool) -> list[dict[str, Any]]:
    """Prepare the track's artifacts once, then run the study's waves; return all final-stage records."""
    from harness.methods import get_method

    mod = track_module(study.track)
    print(f"[sweep] {sweep.name}/{study.name}: preparing {study.track} artifacts (cached after the first run)",
          flush=True)
    mod.prepare(dict(study.settings), study.benchmark, study_tasks(study), print_reporter)
    base = results_dir / sweep.name

    def waves(stage: str, chosen=None) -> list[dict[str, Any]]:
        specs = study_trials(study, stage, chosen)
        first = [s for s in specs if not get_method(s.method).needs_bank]
        later = [s for s in specs if get_method(s.method).needs_bank]
        recs = run_wave(first, study, base / f"{study.name}-{stage}", resume)
        recs += run_wave(later, study, base / f"{study.name}-{stage}-bank", resume)
        return recs

    if study.protocol == "select-then-final":
        selection = waves("select")
        _write_records(base / f"{study.name}-select-records.jsonl", selection)
        chosen = choose_settings(selection, mod.PRIMARY_METRIC)
        missing = [(m, t) for m in study.methods for t in study_tasks(study) if (m, t) not in chosen]
        for key in missing:  # every selection trial failed: fall back to the first grid point, and say so
            print(f"[sweep] no successful selection trial for {key}; final runs use the first grid point",
                  flush=True)
        from harness.sweep_file import expand_grid

        for m, t in missing:
            chosen[(m, t)] = expand_grid(study.methods[m], m)[0]
        records = waves("final", chosen)
    else:
        records = waves("final")
    _write_records(base / f"{study.name}-records.jsonl", records)
    return records


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str, sort_keys=True) + "\n" for r in records))


def run_sweep(sweep: SweepFile, results_dir: Path, leaderboard_dir: Path, resume: bool = False,
              address: str | None = None, dashboard: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Run every study of a sweep through Ray Tune and update the leaderboard after each study."""
    from harness import leaderboard

    init_ray(address, dashboard)
    out: dict[str, list[dict[str, Any]]] = {}
    for study in sweep.studies:
        records = run_study(sweep, study, Path(results_dir), resume)
        out[study.name] = records
        paths = leaderboard.update(records, study, Path(leaderboard_dir))
        failed = [r for r in records if r.get("status") != "ok"]
        print(f"[sweep] {study.name}: {len(records) - len(failed)} trials ok, {len(failed)} failed; "
              f"leaderboard: {', '.join(str(p) for p in paths)}", flush=True)
        for r in failed:
            print(f"[sweep]   failed {r['task']} {r['method']} seed {r['seed']}: {r.get('error', '')}", flush=True)
    return out

"""Resuming a sweep whose trials had not all reported: Ray's restore warns "Failed to fetch metrics ...
FileNotFoundError" for each of them, which reads as lost work; the sweep says what it means instead."""

from __future__ import annotations

import inspect
import logging

from harness.driver import UnreportedTrialsNote, _unreported_trials_said

RAY_LOGGER = "ray.tune.analysis.experiment_analysis"


def _ray_message(errors: list[str]) -> str:
    # the shape of Ray's message (ExperimentAnalysis._fetch_trial_dataframes), checked against its source below
    lines = "\n".join(f"- trial_{i}: {e}" for i, e in enumerate(errors))
    return f"Failed to fetch metrics for {len(errors)} trial(s):\n{lines}"


def test_rays_warning_still_has_the_shape_the_note_reads():
    from ray.tune.analysis import experiment_analysis

    source = inspect.getsource(experiment_analysis)
    assert 'f"Failed to fetch metrics for {len(failures)} trial(s):\\n{fail_str}"' in source
    assert 'f"- {trial}: {repr(error)}"' in source
    assert "raise FileNotFoundError(" in source and experiment_analysis.logger.name == RAY_LOGGER


def test_unreported_trials_get_one_line_and_other_errors_pass(caplog, capsys):
    logger = logging.getLogger(RAY_LOGGER)
    missing = "FileNotFoundError('Could not fetch metrics for t: both result.json and progress.csv were not found')"
    with caplog.at_level(logging.WARNING, logger=RAY_LOGGER):
        with _unreported_trials_said():
            logger.warning(_ray_message([missing, missing, missing]))
            logger.warning(_ray_message([missing, "ValueError('bad json')"]))  # a real problem: kept
            logger.warning("something else entirely")
        logger.warning(_ray_message([missing]))  # outside a restore: Ray's own message
    out = capsys.readouterr().out
    assert "3 trial(s) had reported no result when the sweep stopped" in out and "they run now" in out
    kept = [r.getMessage() for r in caplog.records]
    assert len(kept) == 3, kept
    assert "ValueError('bad json')" in kept[0] and kept[1] == "something else entirely"
    assert kept[2].startswith("Failed to fetch metrics for 1 trial(s)")
    assert not any(isinstance(f, UnreportedTrialsNote) for f in logger.filters)  # removed after the restore

"""Sweep files are validated in full before any compute; errors name the key, the value and the choices."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import ConfigError
from harness.sweep_file import expand_grid, load_sweep, study_trials

GOOD = """
name: tiny
track: rl
benchmark: cw10
tasks: [window-close, faucet-close]
methods:
  full: {lr: [1.0e-4, 3.0e-4]}
  lora: {r: [2, 4], lr: 1.0e-3}
seeds: [0, 1]
budget: {steps: 5}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_file_expands_to_the_grid(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD))
    (study,) = sweep.studies
    specs = study_trials(study, "final")
    # (2 full lrs + 2 lora ranks) x 2 tasks x 2 seeds
    assert len(specs) == 16
    assert {s.method_settings.get("r") for s in specs if s.method == "lora"} == {2, 4}
    assert all(s.budget.steps == 5 for s in specs)


def test_expand_grid():
    assert expand_grid({"r": [1, 2], "lr": 0.1}) == [{"r": 1, "lr": 0.1}, {"r": 2, "lr": 0.1}]


@pytest.mark.parametrize("edit, expected", [
    (("tasks: [window-close, faucet-close]", "tasks: [window-clos]"), r"unknown task of cw10 'window-clos'.*did you mean 'window-close'.*valid"),
    (("lora: {r: [2, 4], lr: 1.0e-3}", "lorra: {r: 2}"), r"unknown method 'lorra'.*valid methods: full, linear, lora"),
    (("lora: {r: [2, 4], lr: 1.0e-3}", "lora: {rank: 2}"), r"methods.lora: method 'lora': unknown setting\(s\) \['rank'\].*valid: .*r"),
    (("seeds: [0, 1]", "seed: [0, 1]"), r"unknown key\(s\) \['seed'\] \(did you mean 'seeds'\?\); valid: .*seeds"),
    (("benchmark: cw10", "benchmark: cw20"), r"unknown rl benchmark 'cw20'.*valid rl benchmarks: cw10"),
    (("track: rl", "track: rll"), r"unknown track 'rll'.*valid tracks: rl, vision"),
    (("budget: {steps: 5}", "budget: {stepz: 5}"), r"unknown budget key\(s\) \['stepz'\] \(did you mean 'steps'\?\).*valid: .*steps"),
    (("budget: {steps: 5}", "settings: {no_such_setting: 1}"), r"unknown rl setting\(s\) \['no_such_setting'\]"),
])
def test_bad_files_name_the_problem(tmp_path, edit, expected):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=expected):
        load_sweep(write(tmp_path, GOOD.replace(old, new)))


def test_set_overrides_and_missing_file(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD), ["budget.steps=7", "seeds=[3]"])
    assert sweep.studies[0].budget["steps"] == 7 and sweep.studies[0].seeds == [3]
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")


def test_cli_reports_bad_sweep_without_traceback(tmp_path, capsys):
    bad = write(tmp_path, GOOD.replace("lora: {r: [2, 4], lr: 1.0e-3}", "lorra: {r: 2}"))
    assert main(["sweep", str(bad), "--no-dashboard", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'lorra'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing ran


def test_cli_run_unknown_task_and_method(capsys):
    assert main(["run", "--track", "rl", "--benchmark", "cw10", "--task", "hamer", "--method", "lora"]) == 2
    assert "did you mean 'hammer'" in capsys.readouterr().err
    assert main(["run", "--track", "rl", "--benchmark", "cw10", "--task", "hammer", "--method", "lorax"]) == 2
    assert "unknown method 'lorax'" in capsys.readouterr().err


def test_shipped_sweep_files_validate():
    root = Path(__file__).resolve().parents[1] / "sweeps"
    files = sorted(root.glob("*.yaml"))
    assert files, "no sweep files shipped"
    for f in files:
        load_sweep(f)


def test_the_device_runbooks_sweep_files_and_scripts_exist_and_validate():
    """A device session is 30 minutes: a sweep file or script the runbook names must not fail there on a typo."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    runbook = (root / "benchmarks" / "scripts" / "device" / "runbook.sh").read_text()
    named = sorted(set(re.findall(r"benchmarks/[\w./-]+\.yaml", runbook)))
    device_files = {str(p.relative_to(root)) for p in (root / "benchmarks" / "device-files").glob("*.yaml")}
    for f in sorted(set(named) | device_files):
        assert (root / f).is_file(), f
        load_sweep(root / f)
    scripts = sorted(set(re.findall(r"benchmarks/[\w./-]+\.(?:py|sh)", runbook)))
    assert "benchmarks/scripts/device/collect.sh" in scripts  # the runbook's own doc names its poller
    for f in scripts:  # and a script it runs must at least exist and parse
        if f.endswith(".py"):
            compile((root / f).read_text(), f, "exec")
        else:
            assert subprocess.run(["bash", "-n", str(root / f)]).returncode == 0, f

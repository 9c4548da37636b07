"""Extension without a fork (issue 19, item 5): a method, a dataset and a track from outside the project.

- A toy method (BitFit: biases only, its own optimiser groups) registered by ``@register_method`` in a
  plugin module written here, run in a tiny sweep through Ray Tune: the workers import the plugin too.
- A toy dataset in NOAH's layout (PNG files written here) runs as the vision benchmark ``custom``.
- A toy track registered by ``@register_track`` in a plugin module runs one tiny trial.
- Misregistrations (bad name, a default that does not fit its kind, a missing class) are clean errors:
  ``python -m harness methods`` exits 2 without a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# the tiny RL settings of tests/test_sweep_e2e.py
TINY_RL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "context": 4, "dropout": 0.0, "data_episodes": 2,
           "noise_levels": [0.0, 0.5], "pretrain_tasks": ["reach"], "pretrain_steps": 20, "pretrain_batch_size": 16,
           "pretrain_eval_episodes": 0, "eval_workers": 1, "data_workers": 1, "device": "cpu", "compile": False,
           "warmup": 0, "grad_clip": 0.0, "eval_pretrained": False}
TINY_VIT = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--set", "img_size=32",
            "--set", "model_kwargs={patch_size: 8, depth: 2}", "--set", "drop_path=0.0", "--set", "threads=1"]

BITFIT = '''
"""A toy plugin: BitFit (Ben Zaken et al. 2022), the biases and the head trained, nothing else."""
from harness.methods import Method, Setting, register_method
from harness.methods.base import freeze, method_state, unfreeze_head


@register_method("{name}")
class BitFit(Method):
    summary = "BitFit: biases only (toy plugin)"
    takes_targets = False
    settings = {{"bias_lr_scale": Setting(1.0, "factor on the learning rate of the biases", kind=float, gt=0)}}

    def wrap(self, model, site, settings, ctx):
        freeze(model)
        biases = [n for n, p in model.named_parameters() if n.endswith(".bias") and not site.is_head_param(n)]
        for n, p in model.named_parameters():
            if n in biases:
                p.requires_grad_(True)
        unfreeze_head(model, site)
        method_state(model)["bitfit_biases"] = biases
        return model

    def optimizer_groups(self, model, settings, weight_decay):
        biases = set(method_state(model)["bitfit_biases"])
        own = [p for n, p in model.named_parameters() if n in biases]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and n not in biases]
        return [{{"params": own, "lr_scale": settings["bias_lr_scale"], "weight_decay": 0.0}}, {{"params": rest}}]
'''

IA3 = '''
"""A toy plugin through peft: IA3 (Liu et al. 2022), learned scales on activations. It takes its sites from
the track: the feed-forward sites' inputs are scaled, the other targets' outputs."""
from harness.methods import register_method
from harness.methods.peft_methods import PeftMethod


@register_method("{name}")
class IA3(PeftMethod):
    summary = "IA3: learned activation scales (toy plugin through peft)"
    rank_limited = False

    def wrap(self, model, site, settings, ctx):
        from peft import IA3Config, get_peft_model

        self.check_fit(model, site, settings)
        config = IA3Config(target_modules=[n for n, _ in site.target_linears(model)],
                           feedforward_modules=site.feedforward_targets(model))
        return self.ready(get_peft_model(model, config), site)
'''

TOY_TRACK = '''
"""A toy track: regress y = w.x on random data with a two-layer MLP."""
from typing import Any

import torch
from pydantic import Field

from harness.tracks import FineTuneSetup
from harness.training import Schedule
from harness.methods import AdapterSite
from harness.tracks import Benchmark, Track, TrackBudget, TrackSettings, register_track


class ToySettings(TrackSettings):
    width: int = Field(16, ge=1)
    adapter_targets: list[str] = Field(default_factory=lambda: ["body"])


class ToyBudget(TrackBudget):
    steps: int = Field(5, ge=1)


class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = torch.nn.Linear(4, width)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@register_track("{name}")
class ToyTrack(Track):
    Settings = ToySettings
    Budget = ToyBudget
    benchmarks = {{"toyreg": Benchmark(name="toyreg", tasks=("line",), primary_metric="mse",
                                       higher_is_better=False, data_source="synthetic")}}

    def prepare(self, settings, benchmark, tasks, report):
        return {{}}

    def make_data(self, settings, tasks):
        return {{}}

    def pretrain(self, settings):
        return {{}}

    def bench(self, settings):
        return {{}}

    def shape_model(self, settings, benchmark):
        with torch.device("meta"):
            return Net(settings.width), AdapterSite(tuple(settings.adapter_targets), ("head",))

    def setup(self, spec, settings, budget, rng, report):
        gen = rng.generator("data")
        w = torch.randn(4, 1, generator=gen)
        x = torch.randn(64, 4, generator=gen)
        y = x @ w

        def loss(model, batch):
            return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

        def evaluate(model):
            with torch.no_grad():
                return {{"mse": float(loss(model, (x, y)))}}, {{}}

        return FineTuneSetup(model=Net(settings.width), site=AdapterSite(tuple(settings.adapter_targets), ("head",)),
                             device=torch.device("cpu"), schedule=Schedule(steps=budget.steps, lr=settings.lr,
                             weight_decay=settings.weight_decay, report_every=0), next_batch=lambda: (x, y),
                             loss=loss, evaluate=evaluate, base_key="toy", backbone="toy-mlp", data_source="synthetic",
                             save_adapter=False)
'''


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def write_module(folder: Path, module: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(textwrap.dedent(text))
    return path


def cli_env(tmp_path: Path, *paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HARNESS_CACHE"] = str(tmp_path / "cache")
    env["RAY_DEDUP_LOGS"] = "0"
    env.pop("RAY_ADDRESS", None)
    # Ray's workers import plugin modules from PYTHONPATH, as the driver does
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def harness(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def registry(monkeypatch):
    """In-process registrations are undone after the test (the registries are module globals)."""
    import harness.methods as methods
    import harness.tracks as tracks

    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    monkeypatch.setattr(methods, "_cache", dict(methods._cache))
    monkeypatch.setattr(tracks, "TRACKS", dict(tracks.TRACKS))
    monkeypatch.setattr(tracks, "_instances", dict(tracks._instances))
    return methods


@pytest.fixture()
def on_path(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


# --- methods -------------------------------------------------------------------------------------------

def test_plugin_method_runs_in_every_ray_worker(tiny_rl_sweep):
    """The bug this fixes: a method registered only in the driver passed validation and then every worker
    failed with 'unknown method'. Named under ``plugins:``, it is imported in the workers too. The shared
    tiny sweep (tests/conftest.py) runs the toy BitFit plugin beside the built-in methods."""
    sweep, name = tiny_rl_sweep, tiny_rl_sweep.plugin_method
    assert sweep.returncode in (0, 1), sweep.output[-4000:]  # 1: the sweep's deliberate NaN trial failed
    recs = [r for r in sweep.records() if r["method"] == name]
    assert len(recs) == 1 and recs[0]["status"] == "ok", recs
    assert json.loads(recs[0]["settings"])["bias_lr_scale"] == 4.0
    assert 0 < recs[0]["trainable_params"] < 2000  # the DT's biases only: a few hundred of its ~15k weights
    import pandas as pd

    assert name in list(pd.read_csv(sweep.board / "tiny-cw10.csv")["method"])


def test_a_plugin_that_fails_to_import_is_refused_before_ray(tmp_path, on_path):
    from harness.sweep_file import load_sweep

    doc = {"name": "ext", "plugins": ["no_such_plugin_module_xyz"], "track": "rl", "benchmark": "cw10",
           "tasks": ["window-close"], "methods": {"full": {}}, "settings": TINY_RL}
    path = tmp_path / "ext.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"plugins: plugin module 'no_such_plugin_module_xyz' was not found"):
        load_sweep(path)
    write_module(on_path, "broken_plugin_mod", "import no_such_dependency_of_the_plugin\n")
    doc["plugins"] = ["broken_plugin_mod"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"plugin module 'broken_plugin_mod' failed to import: .*no_such_dependency"):
        load_sweep(path)
    doc["plugins"] = ["not a module"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"plugins"):
        load_sweep(path)


def test_register_method_checks_name_clash_and_settings(registry, on_path):
    from harness.methods import Method, Setting, get_method, register_method
    from harness.plugins import load_plugins

    module, name = _unique("bitfit_mod"), _unique("bitfit")
    write_module(on_path, module, BITFIT.format(name=name))
    load_plugins([module])
    m = get_method(name)
    assert m.name == name and m.resolve_settings({})["bias_lr_scale"] == 1.0
    assert name in registry.method_names()
    load_plugins([module])  # a second import changes nothing

    class Dummy(Method):
        def wrap(self, model, site, settings, ctx):
            return model

    with pytest.raises(ConfigError, match=r"name 'bit fit' must be 1-40 letters"):
        register_method("bit fit")(Dummy)
    with pytest.raises(ConfigError, match=r"'lora' is already taken by a built-in method .*replace=True"):
        register_method("lora")(Dummy)
    with pytest.raises(ConfigError, match=r"takes a subclass of harness.methods.Method"):
        register_method("thing")(dict)
    with pytest.raises(ConfigError, match=r"setting 'r': its default 'eight' is a str, not of its kind int"):
        class BadDefault(Method):  # noqa: F841 - refused where it is defined
            name = "bad-default"
            settings = {"r": Setting("eight", "rank", kind=int)}
    register_method("lora", replace=True)(Dummy)  # replacing a built-in is allowed when said
    assert isinstance(get_method("lora"), Dummy)


def test_an_activation_scaling_plugin_reads_its_sites_from_the_track(registry, on_path):
    """An IA3-like method from outside the project: the track's site says which targets are feed-forward
    (scaled at their input); the others are scaled at their output. A peft method that does not declare
    itself a pure matmul keeps peft's input casts."""
    import torch
    from peft.tuners.ia3 import IA3Layer

    from agents.dt import SITE, DecisionTransformer, DTConfig
    from harness.methods import MethodContext, get_method
    from harness.plugins import load_plugins

    module, name = _unique("ia3_mod"), _unique("ia3")
    write_module(on_path, module, IA3.format(name=name))
    load_plugins([module])
    method = get_method(name)
    torch.manual_seed(0)
    base = DecisionTransformer(DTConfig(n_layer=2, n_head=2, n_embd=16, context=4, dropout=0.0))
    targeted = sorted(n for n, _ in SITE.target_linears(base))
    assert SITE.feedforward_targets(base) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    model = method.wrap(base, SITE, method.resolve_settings({}), MethodContext())
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, IA3Layer)}
    assert sorted(layers) == targeted
    for n, layer in layers.items():
        ff = n.endswith("mlp.fc2")
        assert layer.is_feedforward == ff  # the track's feed-forward sites, and only they, are input-scaled
        vec = layer.ia3_l["default"]
        assert vec.numel() == (layer.in_features if ff else layer.out_features) and torch.all(vec == 1)
        assert layer.cast_input_dtype_enabled  # not declared a pure matmul: peft's casts stay
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("ia3_l" in n or SITE.is_head_param(n.removeprefix("base_model.model.")) for n in trained)


def test_methods_command_lists_plugins_and_refuses_misregistrations(tmp_path, registry, monkeypatch):
    """``python -m harness methods``: a plugin's method is listed; a misregistered one exits 2 with a message
    naming it, never a traceback (a plugin named by --plugin, or an installed package's entry point). Each
    call runs through ``harness.cli.main`` in this process, from the state a fresh process starts in: the
    registries, the plugins imported and whether entry points were read are put back before each."""
    import harness.plugins as plugins

    registries = {"REGISTRY": dict(registry.REGISTRY), "_cache": dict(registry._cache)}

    def methods_command(args: list[str]) -> subprocess.CompletedProcess:
        for key, value in registries.items():
            monkeypatch.setattr(registry, key, dict(value))
        monkeypatch.setattr(registry, "_entry_points_read", False)
        monkeypatch.setattr(plugins, "_loaded", [])
        return harness_here(["methods", *args])

    plugins_folder = tmp_path / "plugins"
    good, name = _unique("bitfit_cli"), _unique("bitfit")
    # unique module names: a module this process imported once is not imported again
    bad_name, bad_default = _unique("bad_name_mod"), _unique("bad_default_mod")
    write_module(plugins_folder, good, BITFIT.format(name=name))
    write_module(plugins_folder, bad_name, BITFIT.format(name="bit fit"))
    write_module(plugins_folder, bad_default, '''
        from harness.methods import Method, Setting, register_method

        @register_method("wrongkind")
        class WrongKind(Method):
            settings = {"r": Setting(0.5, "rank", kind=int)}
    ''')
    monkeypatch.syspath_prepend(str(plugins_folder))
    out = methods_command(["--plugin", good])
    assert out.returncode == 0, out.stderr
    assert f"{name}" in out.stdout and "bias_lr_scale" in out.stdout and "lora" in out.stdout
    for module, message in ((bad_name, "name 'bit fit' must be 1-40"),
                            (bad_default, "setting 'r': its default 0.5 is a float, not of its kind int"),
                            ("no_such_mod_abc", "plugin module 'no_such_mod_abc' was not found")):
        out = methods_command(["--plugin", module])
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert module in out.stderr
    # an installed package's entry points (a dist-info folder on the path, as pip leaves it)
    site = tmp_path / "site"
    dist = site / "toyplug-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    plain = _unique("bitfit_plain")  # the class alone: the entry point registers it
    write_module(plugins_folder, plain, BITFIT.format(name=name).replace(f'@register_method("{name}")\n', "").replace(
        "    takes_targets = False", f"    takes_targets = False\n    name = {name!r}"))
    (dist / "entry_points.txt").write_text(f"[harness.methods]\n{name} = {plain}:BitFit\n")
    monkeypatch.syspath_prepend(str(site))
    out = methods_command([])
    assert out.returncode == 0 and name in out.stdout and "biases only" in out.stdout, out.stderr
    (dist / "entry_points.txt").write_text(f"[harness.methods]\n{name} = {plain}:BitFits\n")
    out = methods_command([])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "has no class 'BitFits' (did you mean 'BitFit'?)" in out.stderr


def test_optimizer_groups_reach_the_optimizer(registry, on_path, tmp_path, monkeypatch):
    """A method's own parameter groups (LoRA+-like) are what the trial's optimiser holds, their lr_scale
    kept through the schedule; groups that leave a parameter out or name a frozen one are refused."""
    import torch

    from harness.finetune import FineTuneRun
    from harness.plugins import load_plugins
    from harness.training import check_groups, make_adamw, set_lr
    from harness.trial import TrialSpec

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    module, name = _unique("bitfit_opt"), _unique("bitfit")
    write_module(on_path, module, BITFIT.format(name=name))
    load_plugins([module])
    ts = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 1},
          "drop_path": 0.0, "weights": "random", "threads": 1, "lr": 0.01}
    run = FineTuneRun(TrialSpec("vision", "builtin", "shapes", name, {"bias_lr_scale": 8.0}, 0,
                                {"steps": 2, "batch_size": 4}, ts), lambda m: None)
    run.start()
    groups = run.trainer.optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == [8.0, 1.0]
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == run.weight_decay
    biases = {id(p) for n, p in run.model.named_parameters() if n.endswith(".bias") and not n.startswith("head.")}
    assert {id(p) for p in groups[0]["params"]} == biases and len(biases) > 0
    assert all(n.startswith("head.") for n, p in run.model.named_parameters()
               if p.requires_grad and not n.endswith(".bias"))
    while run.step():
        pass
    assert groups[0]["lr"] == pytest.approx(8.0 * groups[1]["lr"])  # the schedule keeps the ratio

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    opt = make_adamw(model, 0.1, 0.0, [{"params": [model[0].bias], "lr_scale": 2.0}, {"params": list(model[1].parameters())}])
    set_lr(opt, 0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    with pytest.raises(ConfigError, match=r"leave trainable parameters out: \['1.bias'\]"):
        check_groups(model, [{"params": [model[0].bias, model[1].weight]}], 0.0)
    with pytest.raises(ConfigError, match=r"'0.weight' is not a trainable parameter"):
        check_groups(model, [{"params": [model[0].weight]}], 0.0)
    with pytest.raises(ConfigError, match=r"lr_scale -1 must be a positive"):
        check_groups(model, [{"params": list(p for p in model.parameters() if p.requires_grad), "lr_scale": -1}], 0.0)


# --- a dataset: the custom vision benchmark ------------------------------------------------------------

def write_noah_folder(root: Path, task: str, classes: int = 3, per_class: int = 4) -> Path:
    """A task folder in NOAH's layout: PNGs under images/, list files train800/val200/test of
    ``relative/path label`` lines (labels 0..classes-1), each class a colour."""
    from PIL import Image

    folder = root / task
    (folder / "images").mkdir(parents=True)
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for c in range(classes):
        for i in range(per_class):
            rel = f"images/c{c}_{i}.png"
            colour = (80 * c % 256, 255 - 60 * c, (40 * i) % 256)
            Image.new("RGB", (20, 20), colour).save(folder / rel)
            split = "train800" if i < per_class // 2 else ("val200" if i == per_class // 2 else "test")
            lines[split].append(f"{rel} {c}")
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def test_custom_benchmark_runs_a_users_folder(tmp_path, monkeypatch):
    """A folder in NOAH's layout runs as ``--benchmark custom --task <folder>``: its class count read from
    its labels (3 here), the record labelled custom, never a VTAB task; a folder named svhn stays custom.
    The command runs through ``harness.cli.main`` in this process (the trial's thread setting undone after)."""
    import torch

    root = tmp_path / "data"
    write_noah_folder(root, "mydigits", classes=3)
    write_noah_folder(root, "svhn", classes=2)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    base = ["run", "--track", "vision", "--benchmark", "custom", "--data-root", str(root), "--method", "linear",
            "--steps", "2", "--json", *TINY_VIT, "--set", "batch_size=4"]
    threads = torch.get_num_threads()
    try:
        out = harness_here([*base, "--task", "mydigits"])
        assert out.returncode == 0, out.stderr[-3000:]
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        assert (rec["track"], rec["benchmark"], rec["task"], rec["status"]) == ("vision", "custom", "mydigits", "ok")
        assert rec["data_source"] == "real" and 0.0 <= rec["top1"] <= 100.0  # percent
        assert rec["head_params"] == (192 + 1) * 3  # vit_tiny's width 192, a head of 3 classes read from the labels
        assert json.loads(rec["extra"])["classes"] == 3
        out = harness_here([*base, "--task", "svhn"])
    finally:
        torch.set_num_threads(threads)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert (rec["benchmark"], rec["task"], rec["head_params"]) == ("custom", "svhn", (192 + 1) * 2)


def test_custom_benchmark_checks_tasks_against_the_folders(tmp_path, monkeypatch):
    from harness.sweep_file import load_sweep
    from harness.tracks import get_track

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    write_noah_folder(root, "mydigits")
    track = get_track("vision")
    settings = track.settings({"data_root": str(root), "weights": "random", "backbone": "vit_tiny_patch16_224"})
    track.check_inputs(settings, "custom", ["mydigits"])
    with pytest.raises(Exception, match=r"custom task 'digits': no folder .*tasks under .*: mydigits"):
        track.check_inputs(settings, "custom", ["digits"])
    with pytest.raises(ConfigError, match=r"task '../mydigits' of custom"):
        track.check_tasks("custom", ["../mydigits"])
    with pytest.raises(ConfigError, match=r"unknown task of vtab1k 'mydigits'"):
        track.check_tasks("vtab1k", ["mydigits"])  # a user's folder is never a VTAB task
    with pytest.raises(ConfigError, match=r"unknown vision benchmark 'vtab'.*valid vision benchmarks: vtab1k, .*custom"):
        track.benchmark("vtab")
    (root / "mydigits" / "val200.txt").unlink()
    with pytest.raises(Exception, match=r"lacks the list file\(s\) val200.txt"):
        track.check_inputs(settings, "custom", ["mydigits"])
    doc = {"name": "c", "track": "vision", "benchmark": "custom", "methods": {"linear": {}},
           "settings": {"data_root": str(root)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"'custom' has no fixed task list .*name them under tasks"):
        load_sweep(path)


def test_custom_rows_are_labelled_custom_on_the_board(tmp_path):
    """The leaderboard's rows and page of a custom study name the custom benchmark."""
    from harness.leaderboard import update
    from harness.site import render
    from harness.sweep_file import Study

    from harness.trial import TrialRecord

    rec = TrialRecord(track="vision", benchmark="custom", task="svhn", method="linear", settings="{}", seed=0,
                      status="ok", head_params=386, backbone="b", data_source="real", budget="{}",
                      date="2025-01-01T00:00:00+00:00", selection="single-point", grid_size=1,
                      metrics={"top1": 0.5}).flat()
    study = Study(name="s", track="vision", benchmark="custom", tasks=["svhn"], methods={"linear": {}})
    paths = update([rec], study, tmp_path)
    import pandas as pd

    table = pd.read_csv(tmp_path / "custom.csv")
    assert list(table["benchmark"]) == ["custom"] and list(table["task"]) == ["svhn"], paths
    render(tmp_path, {"custom"})
    page = (tmp_path / "custom.md").read_text()
    assert "custom" in page and "vtab" not in page.lower()


# --- a track ---------------------------------------------------------------------------------------------

def harness_here(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` through its entry point (``harness.cli.main``) in this process: the same
    parsing, plugin loading, output and exit status without a fresh interpreter's imports. For commands that
    leave no state behind but registrations, which the ``registry`` fixture undoes."""
    import contextlib
    import io

    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return subprocess.CompletedProcess(["python", "-m", "harness", *args], code, out.getvalue(), err.getvalue())


def test_plugin_track_runs_one_trial(tmp_path, registry, on_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    module, name = _unique("toytrack"), _unique("toy").replace("_", "-")
    write_module(on_path, module, TOY_TRACK.format(name=name))
    # a fresh process without --plugin does not know the track: a clean error, no traceback
    out = harness(["run", "--track", name, "--benchmark", "toyreg", "--task", "line", "--method", "lora"],
                  cli_env(tmp_path, on_path))
    assert out.returncode == 2 and f"unknown track {name!r}" in out.stderr and "Traceback" not in out.stderr
    out = harness_here(["tasks", "--plugin", module])
    assert out.returncode == 0 and f"{name}/toyreg (1 tasks, synthetic data, ranked by mse, lower" in out.stdout, \
        out.stderr
    out = harness_here(["run", "--plugin", module, "--track", name, "--benchmark", "toyreg", "--task", "line",
                        "--method", "lora", "--set", "r=2", "--set", "steps=3", "--json"])
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert (rec["track"], rec["benchmark"], rec["task"], rec["status"]) == (name, "toyreg", "line", "ok")
    assert rec["mse"] >= 0 and rec["trainable_params"] == 2 * (4 + 16)  # LoRA r=2 on body (4 -> 16)
    out = harness_here(["methods", "--count", "--plugin", module, "--track", name, "--methods", "lora", "--set",
                        "r=3", "--json"])  # the track's model counted (Track.count_model), no code naming the track
    assert out.returncode == 0 and json.loads(out.stdout)[0]["trainable_params"] == 3 * (4 + 16), out.stderr


def test_register_track_checks(registry, on_path):
    from harness.tracks import Track, get_track, register_track

    with pytest.raises(ConfigError, match=r"track name 'vision' is already taken"):
        register_track("vision")(type("Vision2", (type(get_track("vision")),), {}))
    with pytest.raises(ConfigError, match=r"takes a subclass of harness.tracks.Track"):
        register_track("x")(dict)
    with pytest.raises(ConfigError, match=r"implements .*setup"):
        register_track("half")(type("Half", (Track,), {"Settings": None, "Budget": None, "benchmarks": {}}))

"""``python -m harness methods --count``: every method's trainable parameters on a backbone, without training.

The model is built with random weights (``pretrained=False``: nothing is downloaded), prepared exactly as a
trial prepares it (``harness/study_rules.py``: targets, fused qkv split, alpha rule) and wrapped by each
method; the count is the method's own ``count`` (the papers' way; the task head apart). Two methods need
more than a model to wrap, and get a stand-in that does not change their count:
- EVA / EVA+DoRA initialise from the trial's activations; they are counted as the LoRA of the same
  settings, whose rank budget EVA keeps (with rho > 1 ranks move between layers, so on layers of different
  widths the trained count can differ).
- EigenLoRA builds on a bank of LoRA adapters; a bank of random rank-8 LoRAs on the same targets is
  written to a temporary folder (the count, 2 K r per module, does not depend on the bank's values).
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from harness.errors import ConfigError
from harness.methods import AdapterSite, MethodContext, get_method, method_names
from harness.study_rules import describe, prepare
from harness.sweep_file import expand_grid, load_sweep
from harness.tracks import get_track
from harness.trial import resolve_point

BANK_RANK = 8  # rank of the stand-in bank's LoRAs (the LoRA protocol's r)
BANK_SIZE = 3
NOT_ADAPTER_KEYS = ("lr", "weight_decay")  # settings that never change a count


@dataclass(frozen=True)
class CountRow:
    """One method's count at one point of its settings."""

    method: str
    settings: str  # JSON of the resolved settings (defaults filled in)
    targets: str
    alpha_rule: str
    trainable_params: int  # the method's own, as the papers count them
    head_params: int
    classes: int  # the head's width the count was taken with
    note: str = ""


# RandLoRA's peft config warns that its bases are not saved but regenerated from the PRNG key on load (the
# harness's choice, harness/methods/peft_methods.py). A count saves and loads nothing, so the warning says
# nothing about it; only that warning is silenced, by its text and category, only while counting.
_IRRELEVANT_WARNINGS = ((r"Specified to not save basis_A and basis_B", UserWarning),)


@contextmanager
def _counting_quietly():
    """One intra-op thread and no irrelevant warnings while the models are built and wrapped.

    Counting runs thousands of small operations (initialisers, the SVDs of PiSSA's and EigenLoRA's setup on
    single layers): too small to gain from threads, and each one pays a fork/join of the thread pool. On
    a machine whose cores are busy (two cores shared with other work) the pool's threads wait for each
    other at every barrier: an SVD of one 24 x 768 bank matrix took 40 ms with two threads and 0.4 ms with
    one, and the whole count about 2.7x longer. The caller's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            for message, category in _IRRELEVANT_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        torch.set_num_threads(threads)


def _split_sets(items: list[str], track, methods: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` pairs into (track settings, method settings); unknown keys fail naming both lists."""
    track_keys = set(track.Settings.model_fields)
    method_keys = set().union(*(get_method(m).all_settings() for m in methods)) if methods else set()
    ts: dict[str, Any] = {}
    ms: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. r=8 or adapter_targets=[qkv.q,qkv.v]")
        key, value = item.split("=", 1)
        key, value = key.strip(), yaml.safe_load(value)
        prefix, _, name = key.partition(".")
        if prefix in ("settings", "method") and name:
            (ts if prefix == "settings" else ms)[name] = value
        elif key in track_keys and key in method_keys:
            raise ConfigError(f"--set {key!r} is both a {track.name} track setting and a method setting; say which: "
                              f"--set settings.{key}=... or --set method.{key}=...")
        elif key in track_keys:
            ts[key] = value
        elif key in method_keys:
            ms[key] = value
        else:
            raise ConfigError(f"--set {key!r}: not a setting of the {track.name} track ({', '.join(sorted(track_keys))}) "
                              f"or of the methods counted ({', '.join(sorted(method_keys))})")
    return ts, ms


def _base_model(track, ts, classes: int) -> tuple[nn.Module, AdapterSite]:
    """The track's model with random weights and its adapter site (``Track.count_model``)."""
    return track.count_model(ts, classes)


def _bank(model: nn.Module, site: AdapterSite, folder: Path) -> list[str]:
    """Random LoRA adapters on the site's layers, as peft names their tensors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(BANK_SIZE):
        state = {}
        for name, layer in site.target_linears(model):
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(BANK_RANK, layer.in_features, generator=gen)
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(layer.out_features, BANK_RANK, generator=gen)
        path = folder / f"bank{i}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
    return paths


def _grid(method: str, given: dict[str, Any], sweep_grid: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The settings to count: the sweep's grid points (lr and weight decay dropped), else ``given``."""
    if not sweep_grid:
        return [dict(given)]

    seen, out = set(), []
    for point in expand_grid(sweep_grid, method):
        point = {k: v for k, v in point.items() if k not in NOT_ADAPTER_KEYS}
        point.update(given)
        key = json.dumps(point, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(point)
    return out


def count_methods(track: str, backbone: str | None = None, methods: list[str] | None = None,
                  sets: list[str] | None = None, sweep: str | None = None, classes: int = 100) -> list[CountRow]:
    """Each method's trainable parameters (head apart) on ``backbone`` at the given (or a sweep's) settings.

    sweep: a sweep file; its study on ``track`` gives the track settings (targets, alpha rule, backbone
    unless ``backbone`` is given) and each method's grid. Every input is checked before a model is built.
    """
    tr = get_track(track)
    if not sweep:
        return _count_study(tr, {}, {}, backbone, methods, sets, classes)

    studies = [s for s in load_sweep(sweep, confirmed=True).studies if s.track == track]  # counting runs nothing
    if not studies:
        raise ConfigError(f"sweep file {sweep} has no study on the {track} track")
    rows: list[CountRow] = []
    for study in studies:  # each study's own settings (GLoRA's budgets sit in a study of their own)
        wanted = [m for m in study.methods if not methods or m in methods or m.split("@")[0] in methods]
        if wanted:
            rows += _count_study(tr, dict(study.settings), dict(study.methods), backbone, wanted, sets, classes)
    return rows


def _count_study(tr, study_settings: dict[str, Any], grids: dict[str, dict[str, Any]], backbone: str | None,
                 methods: list[str] | None, sets: list[str] | None, classes: int) -> list[CountRow]:
    track = tr.name
    names = list(methods or (list(grids) if grids else method_names()))
    for m in names:
        get_method(m)  # an unknown name fails here, naming the valid ones
    given_ts, given_ms = _split_sets(sets or [], tr, names)
    raw = {**study_settings, **given_ts}
    if backbone:
        raw["backbone"] = backbone
    ts = tr.settings(raw)
    plans = []
    for name in names:
        method = get_method(name)
        own = {k: v for k, v in given_ms.items() if k in method.all_settings()}
        for point in _grid(name, own, grids.get(name)):
            plans.append((name, method, resolve_point(method, point)))
    shaped = tr.shape_model(ts, "")  # targets and ranks checked on the meta device, before any weights
    if shaped is not None:
        for name, method, settings in plans:
            model, site = copy.deepcopy(shaped[0]), shaped[1]
            site, wrap_settings = prepare(method, settings, ts, model, site)
            method.check_fit(model, site, wrap_settings)

    rows = []
    with _counting_quietly(), tempfile.TemporaryDirectory(prefix="harness-count-") as tmp:
        torch.manual_seed(0)
        base, base_site = _base_model(tr, ts, classes)
        for name, method, settings in plans:
            model = copy.deepcopy(base)
            site, wrap_settings = prepare(method, settings, ts, model, base_site)
            counted, note = method, ""
            ctx = MethodContext(total_steps=1000)
            base_name = name.split("@")[0]
            if base_name in ("eva", "eva-dora"):
                counted = get_method("dora" if base_name == "eva-dora" else "lora")
                wrap_settings = {k: v for k, v in wrap_settings.items() if k in counted.all_settings()}
                note = "counted as the LoRA of the same r: EVA keeps its rank budget"
            elif method.builds_on:
                ctx.adapter_bank = _bank(model, site, Path(tmp))
                note = f"stand-in bank of {BANK_SIZE} random rank-{BANK_RANK} LoRAs"
            elif base_name == "glora":
                cap = settings.get("param_budget_max")
                note = ("the supernet's largest form; the search keeps subnets of at most "
                        f"{int(cap):,} (param_budget_max)" if cap else
                        "the supernet's largest form; a searched subnet is at most this")
            elif base_name == "adalora":
                note = "at the initial rank r + init_r_extra, before pruning to r"
            wrapped = counted.wrap(model, site, wrap_settings, ctx)
            own, head = counted.count(wrapped, site)
            facts = describe(method, settings, ts, base_site)
            rows.append(CountRow(name, json.dumps(settings, sort_keys=True, default=str), facts.targets,
                                 facts.alpha_rule, int(own), int(head), classes, note))
    return rows


def format_rows(rows: list[CountRow]) -> str:
    """A plain table for the terminal."""
    lines = [f"{'method':10s} {'params':>11s} {'head':>8s}  targets / alpha / settings"]
    for r in rows:
        changed = {k: v for k, v in json.loads(r.settings).items()
                   if v != get_method(r.method).all_settings()[k].default}
        extra = f"  ({r.note})" if r.note else ""
        lines.append(f"{r.method:10s} {r.trainable_params:>11,d} {r.head_params:>8,d}  {r.targets or '-'} / "
                     f"{r.alpha_rule or '-'} / {json.dumps(changed, default=str)}{extra}")
    return "\n".join(lines)


def rows_json(rows: list[CountRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)


__all__ = ["CountRow", "count_methods", "format_rows", "rows_json"]

"""The study's rules for every method it runs: the adapter targets and the LoRA family's scale.

Both are read from the study's track settings (``adapter_targets``, ``alpha_rule``), may be overridden by
a method's own settings (``targets``, ``alpha``), and are recorded in every trial record and leaderboard
row (``targets``, ``alpha_rule``). The engine, the trial validation and ``methods --count`` all go
through :func:`prepare`, so a count, a check and a trial see the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from harness.methods.base import AdapterSite, Method
from harness.scaling import DEFAULT_ALPHA_RULE, apply_alpha_rule
from harness.targets import join_targets, parse_targets, prepare_model


@dataclass(frozen=True)
class StudyRules:
    """The rules as one trial applies them, as recorded: ``targets`` comma-joined as the study gave them ("" for a method that adapts
    no chosen layers), ``alpha_rule`` ("" outside the LoRA family)."""

    targets: str
    alpha_rule: str


def method_targets(method: Method, settings: dict[str, Any], track_settings: Any,
                   site: AdapterSite | None = None) -> tuple[str, ...]:
    """The layers ``method`` adapts: its ``targets`` setting, else the study's ``adapter_targets``, else the
    track's site; () for a method that takes none (full fine-tuning, the linear probe)."""
    if not method.takes_targets:
        return ()
    given = settings.get("targets")
    if given:
        return parse_targets(given)
    study = getattr(track_settings, "adapter_targets", None)
    if study:
        return parse_targets(study)
    return tuple(site.targets) if site is not None else ()


def alpha_rule(track_settings: Any) -> str:
    return str(getattr(track_settings, "alpha_rule", DEFAULT_ALPHA_RULE))


def describe(method: Method, settings: dict[str, Any], track_settings: Any,
             site: AdapterSite | None = None) -> StudyRules:
    """The record's ``targets`` and ``alpha_rule`` for one trial."""
    label = ""
    if method.alpha_family:
        _, label = apply_alpha_rule(settings, alpha_rule(track_settings))
    return StudyRules(join_targets(method_targets(method, settings, track_settings, site)), label)


def prepare(method: Method, settings: dict[str, Any], track_settings: Any, model: nn.Module,
            site: AdapterSite) -> tuple[AdapterSite, dict[str, Any]]:
    """Make ``model`` ready for ``method`` under the study's rules, in place: split the fused qkv layers
    a slice target names. Returns the site with the method's targets and the settings the method wraps
    with (alpha filled from the study's rule for the LoRA family)."""
    targets = method_targets(method, settings, track_settings, site)
    if targets:
        prepare_model(model, targets, site.head)
        site = site.with_targets(targets)
    if method.alpha_family:
        settings, _ = apply_alpha_rule(settings, alpha_rule(track_settings))
    return site, settings


def check_fit(method: Method, settings: dict[str, Any], track_settings: Any,
              shaped: tuple[nn.Module, AdapterSite]) -> None:
    """``method.check_fit`` on a copy of the track's shape-only model made ready as a trial would make it
    (slice targets split, alpha rule applied); the shaped model itself stays untouched for the next check."""
    import copy

    model = copy.deepcopy(shaped[0])
    site, wrap_settings = prepare(method, settings, track_settings, model, shaped[1])
    method.check_fit(model, site, wrap_settings)


__all__ = ["StudyRules", "alpha_rule", "check_fit", "describe", "method_targets", "prepare"]

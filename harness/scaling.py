"""One scale rule for the LoRA family in a study.

LoRA, DoRA, PiSSA, OLoRA, AdaLoRA, EVA and EVA+DoRA all scale their update by alpha / r. Comparing EVA at
alpha = 1 with LoRA at alpha = r mixes the initialisation with a 2-16x difference in update scale, so a
study sets one rule (track setting ``alpha_rule``) and every method of the family takes its alpha from
it, unless the method's own ``alpha`` setting is given. The rule, or the explicit value, is recorded in
every trial record and leaderboard row (``alpha_rule``).
"""

from __future__ import annotations

from typing import Any, Callable

from harness.errors import ConfigError, choices_message

# rule -> alpha as a function of the rank r
ALPHA_RULES: dict[str, Callable[[int], float]] = {
    "1": lambda r: 1.0,  # EVA section 4: alpha = 1 for every method (scale 1/r)
    "r": lambda r: float(r),  # scale 1
    "2r": lambda r: 2.0 * r,  # Hu et al. (2021)'s alpha = 2r (scale 2)
}
DEFAULT_ALPHA_RULE = "r"


def apply_alpha_rule(settings: dict[str, Any], rule: str) -> tuple[dict[str, Any], str]:
    """(settings with ``alpha`` filled from ``rule`` when unset, the label recorded for the row).

    The label is ``alpha=1``, ``alpha=r`` or ``alpha=2r`` for the rule, ``alpha=<value> (set)`` when the
    method's settings gave alpha explicitly.
    """
    if rule not in ALPHA_RULES:
        raise ConfigError(choices_message("alpha_rule", rule, list(ALPHA_RULES)))
    if settings.get("alpha") is not None:
        return dict(settings), f"alpha={settings['alpha']:g} (set)"
    filled = dict(settings)
    filled["alpha"] = ALPHA_RULES[rule](int(settings["r"]))
    return filled, f"alpha={rule}"


__all__ = ["ALPHA_RULES", "DEFAULT_ALPHA_RULE", "apply_alpha_rule"]

"""GLoRA's layer forms and the evolutionary search over them (the search code of the authors' ViT-Slim
``GLoRA/``), apart from the layer and method in ``glora.py``.

A candidate is one :class:`LayerForm` per adapted layer; the search needs from a layer only its choices,
its ranks, a random draw and the parameter count of a form (:class:`SearchableLayer`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from harness.errors import ConfigError

TENSORS = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class LayerForm:
    """One layer's choice for each of A..E: "lora<r1>", "vector", "scalar" or "none"."""

    A: str
    B: str
    C: str
    D: str
    E: str

    def text(self) -> str:
        return ",".join(f"{t}={getattr(self, t)}" for t in TENSORS)

    @staticmethod
    def parse(text: str, choices: dict[str, tuple[str, ...]]) -> "LayerForm":
        """Parse "A=lora4,B=vector,C=none,D=scalar,E=vector" (all five keys), checked against ``choices``."""
        parts = dict(p.split("=", 1) for p in text.replace(" ", "").split(",") if "=" in p)
        if set(parts) != set(TENSORS):
            raise ConfigError(f"method 'glora' subnet {text!r}: give a form for each of A, B, C, D, E, e.g. "
                              "'A=lora4,B=vector,C=none,D=scalar,E=vector', or 'largest' / 'random'")
        for t, form in parts.items():
            if form not in choices[t]:
                raise ConfigError(f"method 'glora' subnet {text!r}: {t}={form!r}; valid forms of {t}: "
                                  f"{list(choices[t])}")
        return LayerForm(**parts)


def form_choices(ranks: Sequence[int]) -> dict[str, tuple[str, ...]]:
    """The forms each tensor may take with LoRA ranks ``ranks`` (largest rank first)."""
    loras = tuple(f"lora{r}" for r in ranks)
    return {"A": loras + ("vector", "scalar", "none"), "B": loras + ("vector", "scalar", "none"),
            "C": loras + ("vector", "none"), "D": ("vector", "scalar", "none"), "E": ("vector", "scalar", "none")}


def largest_form(ranks: Sequence[int]) -> LayerForm:
    lora = f"lora{max(ranks)}"
    return LayerForm(A=lora, B=lora, C=lora, D="vector", E="vector")


def lora_rank(form: str) -> int:
    return int(form[len("lora"):])


def form_params(form: LayerForm, d_in: int, d_out: int) -> int:
    """Parameters of one layer's form, by the paper's (and the search code's) per-layer formula."""
    total = 0
    for t in ("A", "B"):
        f = getattr(form, t)
        total += lora_rank(f) * (d_in + d_out) if f.startswith("lora") else {"vector": d_out, "scalar": 1,
                                                                              "none": 0}[f]
    total += lora_rank(form.C) * (d_in + 1) if form.C.startswith("lora") else {"vector": d_in, "none": 0}[form.C]
    for t in ("D", "E"):
        total += {"vector": d_out, "scalar": 1, "none": 0}[getattr(form, t)]
    return total


class SearchableLayer(Protocol):
    """What the search reads from a layer (``glora.GLoRALinear``)."""

    ranks: tuple[int, ...]
    choices: dict[str, tuple[str, ...]]

    def random_form(self, rng: random.Random) -> LayerForm: ...

    def params_of(self, form: LayerForm) -> int: ...


Candidate = tuple[LayerForm, ...]


@dataclass
class SearchResult:
    """What the evolutionary search found; kept on the model and reported by ``describe``."""

    best_score: float
    best_params: int
    scored: int  # candidates scored with ctx.validate
    rejected_budget: int  # candidates outside the parameter budget, never scored
    best_per_generation: list[float] = field(default_factory=list)


@dataclass
class SearchConfig:
    population: int = 50
    generations: int = 20
    parents: int = 10
    mutations: int = 25
    mutation_prob: float = 0.2
    crossovers: int = 25
    budget_min: float = 0
    budget_max: float | None = None
    seed: int = 0


def evolutionary_search(layers: Sequence["SearchableLayer"], score: Callable[[Candidate], float],
                        cfg: SearchConfig) -> tuple[Candidate, SearchResult]:
    """The GLoRA code's evolutionary search over one form per layer; returns the best candidate found."""
    rng = random.Random(cfg.seed)
    seen: dict[Candidate, float | None] = {}  # None: outside the budget, never scored
    rejected = [0]

    def n_params(cand: Candidate) -> int:
        return sum(layer.params_of(f) for layer, f in zip(layers, cand))

    def try_add(cand: Candidate) -> bool:
        """Score ``cand`` unless seen before or outside the budget; True when it was scored."""
        if cand in seen:
            return False
        n = n_params(cand)
        if n < cfg.budget_min or (cfg.budget_max is not None and n > cfg.budget_max):
            seen[cand] = None
            rejected[0] += 1
            return False
        seen[cand] = float(score(cand))
        return True

    def random_cand() -> Candidate:
        return tuple(layer.random_form(rng) for layer in layers)

    def fill(pool: list[Candidate], target: int, make: Callable[[], Candidate], max_tries: int) -> None:
        while len(pool) < target and max_tries > 0:
            max_tries -= 1
            cand = make()
            if try_add(cand):
                pool.append(cand)

    def mutate() -> Candidate:
        parent = rng.choice(top)
        return tuple(LayerForm(**{t: rng.choice(layer.choices[t]) if rng.random() < cfg.mutation_prob
                                  else getattr(f, t) for t in TENSORS}) for layer, f in zip(layers, parent))

    def cross() -> Candidate:
        p1, p2 = rng.choice(top), rng.choice(top)
        return tuple(LayerForm(**{t: getattr(rng.choice((f1, f2)), t) for t in TENSORS}) for f1, f2 in zip(p1, p2))

    candidates: list[Candidate] = []
    # Random draws can fail often under a tight budget; bound the attempts so the search always ends.
    fill(candidates, cfg.population, random_cand, max_tries=cfg.population * 100)
    if not candidates:
        smallest = sum(layer.params_of(LayerForm("none", "none", "none", "none", "none")) for layer in layers)
        largest = sum(layer.params_of(largest_form(layer.ranks)) for layer in layers)
        raise ConfigError(f"method 'glora': no random subnet fell inside the parameter budget "
                          f"[{cfg.budget_min}, {cfg.budget_max}] in {cfg.population * 100} draws; subnets range "
                          f"from {smallest} to {largest} parameters (a typical one has about {(smallest + largest) // 2})")
    top: list[Candidate] = []
    best_per_generation: list[float] = []
    for _ in range(cfg.generations):
        # dict.fromkeys: dedupe in a fixed order, so ties break the same way in every process
        top = sorted(dict.fromkeys(top + candidates), key=lambda c: seen[c], reverse=True)[:cfg.parents]
        best_per_generation.append(seen[top[0]])
        mutants: list[Candidate] = []
        fill(mutants, cfg.mutations, mutate, max_tries=cfg.mutations * 10)
        crosses: list[Candidate] = []
        fill(crosses, cfg.crossovers, cross, max_tries=cfg.crossovers * 10)
        candidates = mutants + crosses
        fill(candidates, cfg.population, random_cand, max_tries=cfg.population * 100)
    scored = {c: s for c, s in seen.items() if s is not None}
    best = max(scored, key=lambda c: scored[c])
    best_per_generation.append(scored[best])
    return best, SearchResult(best_score=scored[best], best_params=n_params(best), scored=len(scored),
                              rejected_budget=rejected[0], best_per_generation=best_per_generation)

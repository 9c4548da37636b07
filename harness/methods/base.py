"""The interface every adapter method follows, on both tracks.

A track builds its model (with the task head already in place), describes it with an
:class:`AdapterSite`, and drives the method through its life:

    settings = resolve_point(method, user_settings)          # harness.trial: validated, defaults filled in
    model = method.wrap(model, site, settings, ctx)          # base frozen, adapter + head trainable
    groups = method.optimizer_groups(model, settings, wd)    # None: the loop's default AdamW groups
    for step ...:
        loss = task_loss (+ method.extra_loss(model) when not None)
        ... optimizer.step(); method.on_step(model, step, ctx)
    model = method.finalize(model, site, settings, ctx)      # e.g. GLoRA's evolutionary search
    counts = method.count(model, site)                       # adapter params, head params apart
    method.save(model, site, settings, folder)               # safetensors + JSON
    model = method.load(fresh_base, site, settings, folder)  # same outputs as before save
    merged = method.merge(model)                             # plain modules, same outputs

Every trainable tensor that is not the head is the method's own and is counted the way the papers do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from functools import cached_property
from typing import Annotated, Any, Callable, Iterable, Literal, Union

import torch
from torch import nn

from pydantic import BaseModel, ConfigDict, Field, create_model

from harness.errors import ConfigError
from harness.validation import Bool, Float, Int, validate


@dataclass(frozen=True)
class AdapterSite:
    """Where a method may act on a track's model.

    targets: module-name suffixes of the ``nn.Linear`` layers to adapt (matched like PEFT's
        ``target_modules`` list: exact name or dotted suffix), e.g. ``("qkv", "attn.proj", "fc1", "fc2")``.
    head: names of the task-head modules; every method trains them, and they are counted apart.
    feedforward: the model's activation-scaling sites that sit at a layer's *input*: name suffixes of the
        second Linear of each feed-forward block (e.g. ``("mlp.fc2",)``). A method that scales activations
        (IA3-like, peft's ``feedforward_modules``) scales these layers' inputs and the other targets'
        outputs; :meth:`feedforward_targets` gives the ones among the targets. A model fact, set by the track.
    """

    targets: tuple[str, ...]
    head: tuple[str, ...]
    feedforward: tuple[str, ...] = ()

    def is_target(self, module_name: str) -> bool:
        return any(module_name == t or module_name.endswith("." + t) for t in self.targets)

    def is_head_param(self, param_name: str) -> bool:
        parts = param_name.split(".")
        for h in self.head:
            hp = h.split(".")
            for i in range(len(parts) - len(hp) + 1):
                if parts[i:i + len(hp)] == hp:
                    return True
        return False

    def with_targets(self, targets: tuple[str, ...]) -> "AdapterSite":
        """The same model's site with other targets (its head and feed-forward sites kept)."""
        return AdapterSite(tuple(targets), self.head, self.feedforward)

    def feedforward_targets(self, model: nn.Module) -> list[str]:
        """Full names of the targeted Linears that are feed-forward sites (input-scaled, see the class)."""
        return [n for n, _ in self.target_linears(model)
                if any(n == f or n.endswith("." + f) for f in self.feedforward)]

    def target_linears(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """The targeted Linear layers, in module order; an error when none match."""
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and self.is_target(n)]
        if not found:
            raise ConfigError(f"no nn.Linear in the model matches the adapter targets {list(self.targets)}")
        return found


@dataclass
class MethodContext:
    """What a method may need from the trial beyond the model.

    total_steps: the trial's number of optimiser updates (AdaLoRA's budget schedule).
    init_batches: returns an iterable of batches from the trial's training data (EVA's initialisation).
    forward_fn: calls the model on one such batch.
    layer_inputs_fn: ``(layer_input, batch) -> 2-d (tokens x features) tensor``: a targeted layer's
        captured input with padded tokens dropped (EVA on the DT); None flattens all tokens.
    validate: scores a model on the validation split, higher is better (GLoRA's search); not the trial's
        evaluation (``FineTuneSetup.evaluate``), which the engine runs after ``finalize``.
    adapter_bank: folders of saved LoRA adapters of the same base model (EigenLoRA), the current task's
        own already left out.
    device: where the model lives.
    """

    total_steps: int = 1000
    seed: int = 0
    init_batches: Callable[[], Iterable[Any]] | None = None
    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    layer_inputs_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    validate: Callable[[nn.Module], float] | None = None
    adapter_bank: list[str] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass(frozen=True)
class Setting:
    """One method setting: its default, type, help, allowed values and bounds.

    Settings are declared as data; :meth:`Method.settings_model` turns them into a pydantic model, so
    method settings are validated the way track settings and budgets are (``harness.validation``).
    """

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    kind: type | tuple[type, ...] | None = None  # inferred from the default when None
    ge: float | None = None  # inclusive lower bound of a number
    gt: float | None = None  # exclusive lower bound of a number

    def annotation(self) -> Any:
        """The pydantic type of the setting's values."""
        if self.choices is not None:
            return Literal[tuple(self.choices)]
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,) if self.kind is not None else (
            (type(self.default),) if self.default is not None else ())
        if not kinds:
            return Any
        bounds = {k: v for k, v in (("ge", self.ge), ("gt", self.gt)) if v is not None}
        members = []
        for k in kinds:
            base = _FIELD_TYPES.get(k, k)
            members.append(Annotated[base, Field(**bounds)] if bounds and k in (int, float) else base)
        return members[0] if len(members) == 1 else Union[tuple(members)]


_FIELD_TYPES: dict[type, Any] = {int: Int, float: Float, bool: Bool, type(None): type(None)}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds)


def _default_problem(s: Setting) -> str | None:
    """Why ``s.default`` is not a value of ``s`` (its kind, choices and bounds), or None when it is. The
    same strictness as a user's value gets (harness.validation): a bool is not an int or a float, an int is
    a float; a string is never a number, even one that would parse."""
    if s.choices is not None:
        return None if s.default in s.choices else f"not one of its choices {list(s.choices)}"
    if s.kind is not None:
        kinds = s.kind if isinstance(s.kind, tuple) else (s.kind,)
        bad_kind = [k for k in kinds if not isinstance(k, type)]
        if bad_kind:
            return f"its kind {bad_kind[0]!r} is not a type"

        def fits(k: type) -> bool:
            if isinstance(s.default, bool) and k in (int, float):
                return False
            return isinstance(s.default, k) or (k is float and isinstance(s.default, int))

        if not any(fits(k) for k in kinds):
            return f"a {type(s.default).__name__}, not of its kind {_kind_name(s.kind)}"
    if isinstance(s.default, (int, float)) and not isinstance(s.default, bool):
        if s.ge is not None and not s.default >= s.ge:
            return f"below its bound >= {s.ge}"
        if s.gt is not None and not s.default > s.gt:
            return f"not above its bound > {s.gt}"
    return None


def check_settings(owner: str, settings: dict[str, Setting]) -> None:
    """Refuse a settings declaration whose default is not a value of its own setting (kind, choices,
    bounds), naming the method, the setting, the default and the kind: found where the method is defined,
    not when a user leaves the setting out of a sweep and the default fails validation mid-sweep."""
    if not isinstance(settings, dict):
        raise ConfigError(f"method {owner!r}: settings must be a dict of name -> Setting, got "
                          f"{type(settings).__name__}")
    for key, s in settings.items():
        if not isinstance(s, Setting):
            raise ConfigError(f"method {owner!r} setting {key!r}: declared as {type(s).__name__}, not as a "
                              "Setting(default, help, ...)")
        problem = _default_problem(s)
        if problem:
            kind = _kind_name(s.kind) if s.kind is not None else "inferred from the default"
            raise ConfigError(f"method {owner!r} setting {key!r}: its default {s.default!r} is {problem} "
                              f"(kind {kind}); fix the declaration's default or kind")


# Settings every method takes: the optimiser's, so a sweep can search them per method.
COMMON_SETTINGS: dict[str, Setting] = {
    "lr": Setting(None, "learning rate (None: the method's default_lr, else the track's)", kind=(float, type(None)),
                  gt=0),
    "weight_decay": Setting(None, "AdamW weight decay (None: the track's default)", kind=(float, type(None)), ge=0),
}


# The setting of every method that adapts chosen layers (Method.takes_targets): which ones. None takes the
# study's track setting ``adapter_targets``; the resolved value is recorded with every trial.
TARGET_SETTINGS: dict[str, Setting] = {
    "targets": Setting(None, "adapter targets, comma-joined names or dotted suffixes of Linears, e.g. "
                             "'qkv.q,qkv.v' (slices of a fused qkv Linear, see harness/targets.py) or 'fc1,fc2'; "
                             "None: the study's adapter_targets", kind=(str, type(None))),
}


def method_state(model: nn.Module) -> dict[str, Any]:
    """The one place a method keeps facts about a model it wrapped (EVA's ranks, GLoRA's search result,
    EigenLoRA's components, the PiSSA save anchor): a plain dict on the model, created on first use.

    It lives on the model, not on the method object, because one method object serves every trial of a
    process; it is not a parameter or buffer, so it never reaches a state dict.
    """
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = {}
        model.__dict__[_STATE_ATTR] = state
    return state


_STATE_ATTR = "harness_method_state"


def check_rank(model: nn.Module, site: "AdapterSite", rank: int, method: str, what: str = "rank r") -> None:
    """Every targeted layer must hold ``rank`` (at most min(d_in, d_out)); the error names the layer."""
    for name, layer in site.target_linears(model):
        limit = min(layer.in_features, layer.out_features)
        if rank > limit:
            raise ConfigError(f"method {method!r}: {what}={rank} is larger than layer {name!r} allows "
                              f"({layer.out_features}x{layer.in_features}, at most {limit})")


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module, site: AdapterSite) -> None:
    for name, p in model.named_parameters():
        if site.is_head_param(name):
            p.requires_grad_(True)


def head_state(model: nn.Module, site: AdapterSite) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if site.is_head_param(n)}


def load_head_state(model: nn.Module, site: AdapterSite, state: dict[str, torch.Tensor]) -> None:
    """Load head tensors by name suffix (PEFT prefixes names with base_model.model.)."""
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        match = [n for n in params if n == name or n.endswith("." + name) or name.endswith("." + n)]
        if len(match) != 1:
            raise ConfigError(f"saved head tensor {name!r} matches {len(match)} parameters of the model")
        with torch.no_grad():
            params[match[0]].copy_(tensor.to(params[match[0]].device, params[match[0]].dtype))


class Method:
    """Base class: subclasses set ``name``, ``summary``, ``settings`` and implement ``wrap``."""

    name: str = ""
    summary: str = ""
    settings: dict[str, Setting] = {}
    # Methods whose saved adapters this method builds on (EigenLoRA's bank: ("lora",)). The driver runs
    # the trials of those methods first and this method's after them; the track hands the adapters over
    # as MethodContext.adapter_bank.
    builds_on: tuple[str, ...] = ()
    default_lr: float | None = None  # a method whose paper trains at another lr than the track's (VeRA)
    takes_targets: bool = True  # False for methods that adapt no chosen layers (full, linear)
    # True for the LoRA family (update scaled by alpha / r): alpha comes from the study's alpha_rule
    # (harness/scaling.py) unless the method's own alpha setting is given.
    alpha_family: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Checked once per class, where it is defined: a declaration error names the method at import.
        super().__init_subclass__(**kwargs)
        check_settings(cls.name or cls.__name__, cls.settings)

    def all_settings(self) -> dict[str, Setting]:
        return {**COMMON_SETTINGS, **(TARGET_SETTINGS if self.takes_targets else {}), **self.settings}

    @cached_property
    def settings_model(self) -> type[BaseModel]:
        """The pydantic model of this method's settings (built once from the declarations)."""
        fields = {k: (s.annotation(), s.default) for k, s in self.all_settings().items()}
        return create_model(f"{type(self).__name__}Settings", __config__=ConfigDict(extra="forbid"), **fields)

    def resolve_settings(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults merged with ``given``; an unknown key or bad value raises ConfigError."""
        return validate(self.settings_model, dict(given or {}), f"method {self.name!r}").model_dump()

    def default_settings(self) -> dict[str, Any]:
        """Every setting at its default (what names a grid point: the settings that differ from these)."""
        return self.settings_model().model_dump()

    def check_fit(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any]) -> None:
        """What can be checked from the model's shape alone (targets exist, ranks fit the layers). Sweeps
        run it before any compute on a meta-device copy of the track's model; ``wrap`` runs it too."""
        if self.takes_targets:  # full fine-tuning and the probe adapt no chosen layers
            site.target_linears(model)

    # --- life cycle -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], ctx: MethodContext) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} is abstract: a method subclass implements wrap()")

    def on_step(self, model: nn.Module, step: int, ctx: MethodContext) -> None:
        """Called after each optimiser step, before zero_grad."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A regulariser added to the task loss, if the method has one."""
        return None

    def optimizer_groups(self, model: nn.Module, settings: dict[str, Any], weight_decay: float
                         ) -> list[dict[str, Any]] | None:
        """The method's own AdamW parameter groups for the wrapped ``model``, or None for the loop's default
        (decay on matrices, none on biases and norms). Each group is ``{"params": [...]}`` with optionally
        ``lr_scale`` (a factor on the scheduled learning rate: LoRA+ trains B at 16x A's rate) and
        ``weight_decay`` (default: ``weight_decay``, the trial's); every trainable parameter in exactly one
        group (``harness.training.check_groups`` refuses anything else)."""
        return None

    def finalize(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], ctx: MethodContext) -> nn.Module:
        """Called once after training, before the final evaluation."""
        return model

    # --- select-then-final --------------------------------------------------------------------------
    def needs_selection(self, settings: dict[str, Any]) -> bool:
        """Whether a trial with ``settings`` chooses something on the validation data itself (GLoRA's
        subnet search), so that its selection stage must run even for a single grid point."""
        return False

    def final_settings(self, settings: dict[str, Any], described: dict[str, Any]) -> dict[str, Any]:
        """The final stage's settings from the chosen selection trial's settings and what it described
        (:meth:`describe`): what selection chose inside the trial is carried over, never chosen again on
        data the final stage trains on."""
        return dict(settings)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific facts worth recording with the trial (EVA's rank per layer, GLoRA's subnet)."""
        return {}

    def count(self, model: nn.Module, site: AdapterSite) -> tuple[int, int]:
        """(method's trainable parameters, head parameters), as the papers count them."""
        return count_trainable(model, site)

    def save(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path) -> None:
        """Write the trainable state (safetensors) and the settings (JSON) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(folder / "trainable.safetensors"))
        write_settings(folder, self.name, settings)

    def load(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path,
             ctx: MethodContext | None = None) -> nn.Module:
        """Rebuild the adapted model on a fresh ``model`` (same base as at wrap time) from ``folder``."""
        from safetensors.torch import load_file

        wrapped = self.wrap(model, site, settings, ctx or MethodContext())
        state = load_file(str(Path(folder) / "trainable.safetensors"))
        missing = [n for n in state if n not in dict(wrapped.named_parameters())]
        if missing:
            raise ConfigError(f"{folder}: saved tensors {missing[:3]} do not exist in the model")
        wrapped.load_state_dict(state, strict=False)
        return wrapped

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain model with the adapter folded into its weights (identity when there is nothing to fold)."""
        return model


def count_trainable(model: nn.Module, site: AdapterSite, skip: set[int] | frozenset[int] = frozenset()
                    ) -> tuple[int, int]:
    """(trainable non-head elements, trainable head elements), leaving out parameters whose id is in ``skip``."""
    own = head = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        if site.is_head_param(name):
            head += p.numel()
        else:
            own += p.numel()
    return own, head


def write_settings(folder: Path, method: str, settings: dict[str, Any]) -> None:
    (Path(folder) / "method.json").write_text(json.dumps({"method": method, "settings": settings}, indent=1,
                                                         sort_keys=True, default=str))


def read_settings(folder: Path) -> tuple[str, dict[str, Any]]:
    data = json.loads((Path(folder) / "method.json").read_text())
    return data["method"], data["settings"]

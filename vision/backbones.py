"""Backbones: any timm ViT by name, weights from a local file, an offline Hugging Face cache, the
harness's own formula-pretrained checkpoint ("builtin") or a random initialisation ("random").

Nothing here ever downloads: the Hugging Face cache is only read, with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import ConfigError, DataError, choices_message
from harness.methods.base import AdapterSite
from harness.targets import check_targets

DEFAULT_TARGETS: tuple[str, ...] = ("qkv", "attn.proj", "fc1", "fc2")
HEAD: tuple[str, ...] = ("head",)
FEEDFORWARD: tuple[str, ...] = ("mlp.fc2",)  # timm blocks' second MLP Linear (AdapterSite.feedforward)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
# normalization setting -> (mean, std); "backbone" takes the timm pretrained tag's own
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "backbone": None,
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),  # NOAH / GLoRA's VTAB-1K preprocessing, on every backbone
    "inception": (INCEPTION_MEAN, INCEPTION_STD),  # timm's own for the in21k ViTs (augreg, orig)
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


@dataclass
class Backbone:
    """A built model plus what a trial needs to know about it."""

    model: nn.Module
    name: str  # timm name as given (may carry a pretrained tag)
    weights: str  # "random", "builtin:<key>", "hf-cache:<repo>", or the file path
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    site: AdapterSite
    base_key: str  # identifies the frozen base for adapter banks
    notes: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        # Real weights say which input statistics they ran with: the VTAB-1K protocol (ImageNet mean/std)
        # and timm's own (0.5) are both in use for the same checkpoint.
        norm = self.notes.get("normalization")
        return f"{self.name} [{self.weights}, norm {norm}]" if norm else f"{self.name} [{self.weights}]"


def check_model_name(name: str) -> str:
    """Return timm's architecture name for ``name`` (tag stripped); unknown -> ConfigError naming close ones."""
    import timm
    from timm.models import split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if timm.is_model(arch):
        return arch
    all_names = timm.list_models()
    close = difflib.get_close_matches(arch, all_names, n=5, cutoff=0.5)
    hint = f"; close timm names: {', '.join(close)}" if close else ""
    raise ConfigError(f"unknown backbone {name!r}: timm has no model {arch!r}{hint}"
                      ". List them with timm.list_models('vit_*').")


def create(name: str, num_classes: int, img_size: int | None = None, drop_path: float = 0.0,
           model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised timm model with a fresh ``num_classes`` head (never pretrained=True here)."""
    import timm

    check_model_name(name)
    kwargs = dict(model_kwargs or {})
    if img_size:
        kwargs["img_size"] = int(img_size)
    try:
        return timm.create_model(name, pretrained=False, num_classes=int(num_classes), drop_path_rate=drop_path,
                                 **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone {name!r} does not accept the settings {kwargs}: {e}") from e


def model_img_size(model: nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a flat state dict from .safetensors / .pth / .pt / .bin / flat .npz (names as the timm model's)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix == ".npz":
            import numpy as np

            with np.load(str(path), allow_pickle=False) as z:
                state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"weights file {path}: could not be read as {suffix} ({type(e).__name__}: {e})") from e
    # Training checkpoints nest the weights ("model", "state_dict", "module." prefixes).
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"weights file {path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_jax_npz(path: Path) -> bool:
    import numpy as np

    try:
        with np.load(str(path), allow_pickle=False) as z:
            return any(k.endswith("embedding/kernel") for k in z.files)
    except Exception as e:  # noqa: BLE001 - random bytes, a pickle, a truncated archive: all unreadable
        raise DataError(f"weights file {path}: could not be read as .npz ({type(e).__name__}: {e})") from None


def load_weights_file(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load ``path`` into ``model`` (head excluded: it is replaced per task). Mismatch -> DataError naming keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"weights file {path} does not exist (give a {', '.join(WEIGHT_SUFFIXES)} file, "
                        "'builtin', 'random' or 'hf-cache')")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise DataError(f"weights file {path}: unsupported suffix {path.suffix!r}; valid: {', '.join(WEIGHT_SUFFIXES)}")
    head_names = {n for n, _ in model.named_parameters() if n.split(".")[0] in HEAD}
    if path.suffix.lower() == ".npz" and _is_jax_npz(path):
        # Google's augreg checkpoints: timm's own JAX loader maps names and resamples the position embedding.
        from timm.models.vision_transformer import _load_weights

        head_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in head_names}
        try:
            _load_weights(model, str(path))
        except Exception as e:
            raise DataError(f"weights file {path}: does not fit {type(model).__name__} "
                            f"({type(e).__name__}: {e})") from e
        with torch.no_grad():  # keep the task head fresh even when the class count happens to match
            for n, p in model.named_parameters():
                if n in head_before:
                    p.copy_(head_before[n])
        return {"format": "jax-npz"}
    state = read_state_dict(path)
    try:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            # timm's filter adapts patch-embedding and position-embedding sizes (e.g. DINOv2 518 -> 224).
            state = checkpoint_filter_fn(state, model)
    except Exception as e:
        raise DataError(f"weights file {path}: timm could not adapt it to {type(model).__name__} "
                        f"({type(e).__name__}: {e})") from e
    state = {k: v for k, v in state.items() if k.split(".")[0] not in HEAD}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and k.split(".")[0] not in HEAD)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {'; '.join(wrong[:4])}")
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the file, e.g. {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:4])}")
        raise DataError(f"weights file {path} does not match the architecture {type(model).__name__} "
                        f"({model.pretrained_cfg.get('architecture', '?')}): " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return {"format": path.suffix.lower().lstrip("."), "tensors": len(state)}


def hf_cache_file(name: str) -> Path:
    """The locally cached weights of a timm pretrained tag, or DataError (never downloads)."""
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise DataError(f"backbone {name!r}: timm names no Hugging Face repository for it; give --weights FILE")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, fname)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    raise DataError(f"weights 'hf-cache': {repo} is not in the offline Hugging Face cache ({HF_HUB_CACHE}); "
                    f"put it there once (huggingface-cli download {repo}) or give --weights FILE")


def build_backbone(name: str, num_classes: int, weights: str, img_size: int | None = None,
                   drop_path: float = 0.0, model_kwargs: dict[str, Any] | None = None,
                   targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
                   builtin_checkpoint: Path | None = None, builtin_key: str = "",
                   normalization: str = "backbone") -> Backbone:
    """Build ``name`` with a fresh ``num_classes`` head and load ``weights``.

    weights: "random"; "builtin" (``builtin_checkpoint``, the harness's formula-pretrained checkpoint);
    "hf-cache" (timm's pretrained tag from the local Hugging Face cache); or a path to a weights file.
    normalization: "backbone" (the timm tag's mean/std), "imagenet" or "inception" (0.5); named in
    ``describe()`` for real weights.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(choices_message("normalization", normalization, list(NORMALIZATIONS)))
    model = create(name, num_classes, img_size, drop_path, model_kwargs)
    size = model_img_size(model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    notes: dict[str, Any] = {}
    if weights == "random":
        source, key = "random", f"random:{name}"
    elif weights == "builtin":
        if builtin_checkpoint is None:
            raise ConfigError("weights 'builtin' need the pretrained checkpoint (run: python -m harness pretrain vision)")
        notes = load_weights_file(model, builtin_checkpoint)
        mean, std = IMAGENET_MEAN, IMAGENET_STD  # the harness pretrains with ImageNet statistics
        source, key = f"builtin:{builtin_key[:12]}", f"builtin:{builtin_key}"
    elif weights == "hf-cache":
        path = hf_cache_file(name)
        notes = load_weights_file(model, path)
        source, key = f"hf-cache:{path.parent.parent.parent.name}", f"hf:{name}"
    else:
        path = Path(weights).expanduser()
        notes = load_weights_file(model, path)
        st = path.stat()
        source, key = str(path), f"file:{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    chosen = NORMALIZATIONS[normalization]
    if chosen is not None and weights not in ("random", "builtin"):
        mean, std = chosen
    if weights not in ("random", "builtin"):
        notes = {**notes, "normalization": _norm_label(mean, std)}
    site = AdapterSite(targets=tuple(targets), head=HEAD, feedforward=FEEDFORWARD)
    check_targets(model, site.targets, HEAD)  # a bad adapter_targets setting fails here, before training
    key = f"{key}|{name}|{size}|{sorted((model_kwargs or {}).items())}"
    return Backbone(model, name, source, size, mean, std, site, key, notes)


def _norm_label(mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    for name, pair in NORMALIZATIONS.items():
        if pair is not None and tuple(mean) == pair[0] and tuple(std) == pair[1]:
            return name
    return f"mean {tuple(mean)} std {tuple(std)}"

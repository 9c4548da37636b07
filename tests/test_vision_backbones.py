"""Backbones: timm names, weights from .safetensors / .pth / .npz files, mismatches, offline HF cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import ConfigError, DataError
from vision import backbones

TINY = dict(patch_size=8, depth=2)


def _tiny(num_classes: int = 5, **kw):
    torch.manual_seed(0)
    return backbones.create("vit_tiny_patch16_224", num_classes, 32, 0.0, {**TINY, **kw})


def test_unknown_backbone_names_close_ones():
    with pytest.raises(ConfigError, match=r"unknown backbone 'vit_tiny_patch16_22'.*close timm names: .*vit_tiny_patch16_224"):
        backbones.check_model_name("vit_tiny_patch16_22")
    assert backbones.check_model_name("vit_base_patch16_224.augreg_in21k") == "vit_base_patch16_224"


def test_paper_backbones_build_at_224():
    for name in ("vit_base_patch16_224.augreg_in21k", "vit_base_patch14_dinov2.lvd142m"):
        bb = backbones.build_backbone(name, 7, "random", 224, 0.0, {"depth": 1})
        assert bb.img_size == 224 and bb.model.head.out_features == 7
        assert bb.site.targets == backbones.DEFAULT_TARGETS and bb.site.head == ("head",)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
def test_weights_file_round_trip(tmp_path, suffix):
    src = _tiny(num_classes=11).eval()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif suffix == ".pth":
        torch.save({"model": state}, path)  # nested, as training checkpoints are
    else:
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    bb = backbones.build_backbone("vit_tiny_patch16_224", 4, str(path), 32, 0.0, TINY)
    model = bb.model.eval()
    assert model.head.out_features == 4  # head replaced per task, never loaded
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), src.forward_features(x), atol=1e-6)
    assert bb.weights == str(path)


def test_weights_file_other_architecture(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny(depth=3).state_dict().items()}, str(path))
    with pytest.raises(DataError, match=r"deeper\.safetensors does not match.*unexpected key.*blocks\.2\."):
        backbones.build_backbone("vit_tiny_patch16_224", 4, str(path), 32, 0.0, TINY)
    wide = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in backbones.create(
        "vit_small_patch16_224", 4, 32, 0.0, TINY).state_dict().items()}, str(wide))
    with pytest.raises(DataError, match=r"wide\.safetensors.*(shape mismatch|could not adapt)"):
        backbones.build_backbone("vit_tiny_patch16_224", 4, str(wide), 32, 0.0, TINY)


def test_weights_file_missing_or_unreadable(tmp_path):
    with pytest.raises(DataError, match=r"nope\.safetensors does not exist"):
        backbones.build_backbone("vit_tiny_patch16_224", 4, str(tmp_path / "nope.safetensors"), 32, 0.0, TINY)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.pth: could not be read"):
        backbones.build_backbone("vit_tiny_patch16_224", 4, str(bad), 32, 0.0, TINY)


def test_hf_cache_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"timm/vit_base_patch16_224\.augreg_in21k is not in the offline"):
        backbones.hf_cache_file("vit_base_patch16_224.augreg_in21k")


def test_bad_adapter_targets():
    with pytest.raises(ConfigError, match="adapter targets"):
        backbones.build_backbone("vit_tiny_patch16_224", 4, "random", 32, 0.0, TINY, targets=("nothing_here",))

"""The vision track end to end on CPU: tiny ViTs, tiny folders written here, real timm and peft."""

from __future__ import annotations

import pytest

from harness.errors import ConfigError, DataError
from harness.trial import TrialSpec, resolve_trial
from harness.finetune import run_trial
from tests.test_vision_data import write_fewshot, write_imagenet, write_vtab
from harness.tracks import get_track

track = get_track("vision")

TINY = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 2},
        "drop_path": 0.0, "weights": "random", "threads": 1}
SMALL_PRETRAIN = {"pretrain_classes": 4, "pretrain_steps": 3, "pretrain_batch_size": 8, "pretrain_points": 256}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def quiet(_m):
    pass


def _spec(benchmark, task, method="linear", stage="final", steps=2, **ts):
    return TrialSpec("vision", benchmark, task, method, {}, 0, {"steps": steps, "stage": stage, "batch_size": 8},
                     {**TINY, **ts})


def test_interface_tables():
    b = track.benchmarks
    assert set(b) >= {"vtab1k", "fewshot", "domain_shift", "builtin", "builtin-fewshot", "builtin-shift"}
    assert len(b["vtab1k"].tasks) == 19 and len(b["fewshot"].tasks) == 25
    assert {g: len(t) for g, t in b["vtab1k"].groups.items()} == {"natural": 7, "specialized": 4, "structured": 8}
    assert all(x.primary_metric == "top1" and x.higher_is_better for x in b.values())
    assert track.Budget().stage == "final" and track.budget({"stage": "select"}).stage == "select"
    assert track.data_source("builtin") == "synthetic" and track.data_source("vtab1k") == "real"
    with pytest.raises(ConfigError, match=r"unknown vision setting\(s\) \['bakbone'\] \(did you mean 'backbone'\?\); valid: .*backbone"):
        track.settings({"bakbone": "x"})
    with pytest.raises(ConfigError, match=r"budget key 'steps'=0: must be >= 1"):
        track.budget({"steps": 0})


def pretrain(ts):
    return track.pretrain(track.settings(ts))


def bench(ts):
    return track.bench(track.settings(ts))


def test_vtab_trial_select_and_final(tmp_path):
    write_vtab(tmp_path / "vtab")
    ts = {"data_root": str(tmp_path / "vtab")}
    track.prepare(track.settings({**TINY, **ts}), "vtab1k", ["dtd"], quiet)
    sel = run_trial(_spec("vtab1k", "dtd", "full", "select", **ts), quiet)
    assert sel.status == "ok", sel.error
    assert sel.extra["eval_split"] == "val200" and sel.extra["train_images"] == 8
    fin = run_trial(_spec("vtab1k", "dtd", "linear", "final", **ts), quiet)
    assert fin.status == "ok", fin.error
    assert fin.extra["eval_split"] == "test" and fin.extra["train_images"] == 12
    assert 0.0 <= fin.metrics["top1"] <= 100.0 and fin.data_source == "real"
    assert fin.trainable_params == 0 and fin.head_params == 192 * 47 + 47
    assert fin.backbone.startswith("vit_tiny_patch16_224 [random]")


def test_prepare_fails_before_training_on_bad_folder(tmp_path):
    folder = write_vtab(tmp_path / "vtab")
    (folder / "test.txt").unlink()
    with pytest.raises(DataError, match=r"test\.txt does not exist"):
        track.prepare(track.settings({**TINY, "data_root": str(tmp_path / "vtab")}), "vtab1k", ["dtd"], quiet)
    rec = run_trial(_spec("vtab1k", "dtd", data_root=str(tmp_path / "vtab")), quiet)
    assert rec.status == "failed" and "test.txt does not exist" in rec.error and "traceback" not in rec.extra


def test_unknown_backbone_fails_cleanly():
    rec = run_trial(_spec("builtin", "shapes", backbone="vit_tiny_patch16_22"), quiet)
    assert rec.status == "failed" and "close timm names" in rec.error and "traceback" not in rec.extra


def test_builtin_lora_and_pretrained_backbone():
    ts = {**SMALL_PRETRAIN, "weights": "builtin"}
    out = pretrain({**TINY, **ts})
    assert out["steps"] == 3 and out["checkpoint"].endswith("model.safetensors")
    assert pretrain({**TINY, **ts})["checkpoint"] == out["checkpoint"]  # cached, not retrained
    rec = run_trial(_spec("builtin", "shapes", "lora", **ts), quiet)
    assert rec.status == "ok", rec.error
    assert rec.data_source == "synthetic" and "[builtin:" in rec.backbone
    assert rec.trainable_params > 0 and rec.head_params == 192 * 6 + 6
    assert rec.adapter_path and rec.metrics["top1"] >= 0


def test_pretrain_instance_pool():
    """pretrain_instances > 0 trains on a pre-rendered pool; it is part of the cache key."""
    a = pretrain({**TINY, **SMALL_PRETRAIN})
    b = pretrain({**TINY, **SMALL_PRETRAIN, "pretrain_instances": 3})
    assert b["instances"] == 3 and a["instances"] == 0 and b["checkpoint"] != a["checkpoint"]
    assert b["final_loss"] is not None


def test_builtin_shift_and_fewshot_metrics():
    rec = run_trial(_spec("builtin-shift", "digits"), quiet)
    assert rec.status == "ok", rec.error
    assert {"top1", "top1_sketch", "top1_noise", "top1_recolor"} <= set(rec.metrics)
    assert rec.extra["train_images"] == 160 and len(rec.extra["shot_paths"]) == 160
    fs = run_trial(_spec("builtin-fewshot", "textures-1shot"), quiet)
    assert fs.status == "ok" and fs.extra["train_images"] == 8


def test_fewshot_and_domain_shift_trials(tmp_path):
    write_fewshot(tmp_path / "data")
    write_imagenet(tmp_path / "data")
    ts = {"data_root": str(tmp_path / "data"), "shift_shots": 2}
    fs = run_trial(_spec("fewshot", "food101-2shot", **ts), quiet)
    assert fs.status == "ok", fs.error
    assert len(fs.extra["shot_paths"]) == 6
    ds = run_trial(_spec("domain_shift", "imagenet", **ts), quiet)
    assert ds.status == "ok", ds.error
    assert {"top1", "top1_imagenet", "top1_v2", "top1_a"} <= set(ds.metrics)
    assert ds.extra["skipped_test_sets"] == ["sketch", "r"]


def test_resolve_trial_accepts_vision_specs():
    resolve_trial(_spec("builtin", "count"))
    with pytest.raises(ConfigError, match="did you mean 'count'"):
        resolve_trial(_spec("builtin", "cont"))


def test_bench_runs_on_cpu():
    out = bench({**TINY, "bench_steps": 2})
    assert out["full"]["images_per_s"] > 0
    assert "images_per_s" in out["lora"] and 0 <= out["full"]["data_share"] <= 1


def test_a_padded_short_batch_gives_the_short_batchs_loss_and_gradients():
    """An epoch's last, short batch is filled up to the batch size with ignored rows (vision/train.py): the
    loss and every gradient are the short batch's, so padding changes the step's shape, not its update."""
    import torch

    from vision.backbones import build_backbone
    from vision.images import Split
    from vision.train import IGNORE_LABEL, DeviceSplit, classification_loss

    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_patch16_224", 5, "random", 32, 0.0, {"patch_size": 8, "depth": 1}, ())
    model = bb.model.eval()  # no dropout: the two calls must see the same function
    split = Split(torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 4, 0, 1]))
    data = DeviceSplit.make(split, 32, bb.mean, bb.std, torch.device("cpu"))
    idx = torch.tensor([5, 2, 6])

    def loss_and_grads(batch):
        model.zero_grad()
        loss = classification_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    short = data.batch(idx)
    padded = data.batch(idx, pad_to=8)
    assert padded[0].shape == (8, 3, 32, 32) and padded[1].tolist() == [0, 2, 1] + [IGNORE_LABEL] * 5
    assert torch.equal(padded[0][:3], short[0]) and data.batch(idx, pad_to=3)[0].shape[0] == 3
    loss_s, grads_s = loss_and_grads(short)
    loss_p, grads_p = loss_and_grads(padded)
    torch.testing.assert_close(loss_p, loss_s)
    for gp, gs in zip(grads_p, grads_s):
        torch.testing.assert_close(gp, gs, rtol=1e-5, atol=1e-6)
    assert loss_s > 0 and any(g.abs().sum() > 0 for g in grads_s)  # the comparison can fail


def test_a_compiled_vision_trial_compiles_once_across_an_epochs_short_batch(tmp_path, monkeypatch):
    """12 training images at batch 8: every epoch ends on a batch of 4. Padded to 8, the compiled loss keeps
    one shape, so the trial's trainer runs the process's shared compiled loss through the epoch boundary (one
    graph) instead of refusing it at the short batch and compiling a frame of its own (issue 20 item 4:
    every VTAB trial read "own after shared" on the H200, 2026-12-03). On the CPU, with AOT autograd and
    eager kernels standing in for inductor, as in tests/test_trial_reuse.py."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from harness import process_cache, training

    write_vtab(tmp_path / "vtab")
    ts = {"data_root": str(tmp_path / "vtab"), "compile": True}
    track.prepare(track.settings({**TINY, **ts}), "vtab1k", ["dtd"], quiet)
    monkeypatch.setattr(training, "COMPILED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(process_cache, "_steps", {})
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(training, "COMPILE_BACKEND", counter)
    rec = run_trial(_spec("vtab1k", "dtd", "lora", "final", steps=5, **ts), quiet)
    assert rec.status == "ok", rec.error
    assert rec.extra["train_images"] == 12 and rec.extra["batch_size"] == 8
    assert rec.extra["compiled_step"] == "shared"
    assert counter.frame_count == 1 and rec.extra["graphs_compiled"] == 1
    # the next trial of the structure in this process runs that graph and compiles none
    again = run_trial(_spec("vtab1k", "dtd", "lora", "final", steps=5, **ts), quiet)
    assert again.extra["compiled_step"] == "shared" and again.extra["graphs_compiled"] == 0
    assert counter.frame_count == 1
    # unpadded, as every VTAB trial was: the short batch refuses the shared graph, and the trial's own frame
    # compiles twice (the short shape, then a dynamic batch); the record counts them and the trial says so
    from vision.train import DeviceSplit

    unpadded = DeviceSplit.batch
    monkeypatch.setattr(DeviceSplit, "batch", lambda self, idx, pad_to=None: unpadded(self, idx))
    with pytest.warns(UserWarning, match=r"lora on dtd \(seed 0\): its compiled step compiled 2 graphs"):
        old = run_trial(_spec("vtab1k", "dtd", "lora", "final", steps=5, **ts), quiet)
    assert old.extra["compiled_step"] == "own after shared" and old.extra["graphs_compiled"] == 2

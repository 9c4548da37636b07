"""Where trials run: the device and cores a trial takes, alone and under Ray Tune (issue 13's placement)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.errors import ConfigError
from harness.placement import RaySlice, host_cpus, resolve_device

ON_GPU3 = RaySlice(cpus=4.0, gpus=0.25, gpu_ids=("3",))
NO_GPU = RaySlice(cpus=2.0, gpus=0.0, gpu_ids=())


def test_alone_auto_takes_a_visible_gpu_or_the_cpu():
    assert resolve_device("auto", 0, None, None) == "cpu"
    assert resolve_device("auto", 2, None, None) == "cuda"
    assert resolve_device("cpu", 2, None, None) == "cpu"
    assert resolve_device("cuda:1", 2, "0,1", None) == "cuda:1"


def test_alone_a_gpu_that_is_not_visible_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"no CUDA GPU is visible \(CUDA_VISIBLE_DEVICES ''\)"):
        resolve_device("cuda", 0, "", None)
    with pytest.raises(ConfigError, match="only 2 GPU.*CUDA_VISIBLE_DEVICES '4,5'.*use one of cuda:0, cuda:1"):
        resolve_device("cuda:2", 2, "4,5", None)


def test_a_ray_trial_uses_the_gpu_ray_made_visible():
    # Ray set CUDA_VISIBLE_DEVICES to the trial's GPU: torch numbers it 0
    assert resolve_device("auto", 1, "3", ON_GPU3) == "cuda"
    assert resolve_device("cuda", 1, "3", ON_GPU3) == "cuda"
    with pytest.raises(ConfigError, match="only 1 GPU"):
        resolve_device("cuda:1", 1, "3", ON_GPU3)


def test_a_ray_trial_without_a_gpu_share_never_takes_one():
    # the node has GPUs but the trial holds none (gpus_per_trial 0): using one would take another's share
    assert resolve_device("auto", 8, None, NO_GPU) == "cpu"
    with pytest.raises(ConfigError, match="holds no GPU.*gpus_per_trial"):
        resolve_device("cuda", 8, None, NO_GPU)


def test_when_ray_leaves_cuda_visible_devices_alone_the_physical_id_is_found():
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: torch sees every GPU; the trial's is Ray's id
    assert resolve_device("auto", 8, None, ON_GPU3, noset=True) == "cuda:3"
    assert resolve_device("auto", 2, "2,3", ON_GPU3, noset=True) == "cuda:1"  # 3 is the second visible
    with pytest.raises(ConfigError, match="GPU 3, which CUDA_VISIBLE_DEVICES '0,1' hides"):
        resolve_device("auto", 2, "0,1", ON_GPU3, noset=True)
    with pytest.raises(ConfigError, match="Ray placed this trial on GPU 3"):
        resolve_device("cuda:0", 8, None, ON_GPU3, noset=True)


def test_a_tune_trial_sizes_its_pools_to_its_own_cores(tmp_path):
    """In a real Tune trial holding 1 core: placement, rollout and data pools all see 1 core and no GPU;
    the driver (outside any trial) sees the whole machine."""
    import ray
    from ray import tune

    def trial(config):
        from agents.data import default_workers
        from agents.track import RLSettings, rollout_groups, rollout_workers
        from harness.placement import describe, ray_slice, trial_device, usable_cpus

        s = ray_slice()
        tune.report({"cpus": usable_cpus(), "slice_cpus": s.cpus, "slice_gpus": s.gpus,
                     "device": str(trial_device("auto")), "rollouts": rollout_workers(RLSettings(), 10),
                     "groups": rollout_groups(RLSettings(), trial_device("auto"), s),
                     "data": default_workers(), "described": describe("cpu")["cpus"]})

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        from harness.placement import ray_slice, usable_cpus

        assert ray_slice() is None and usable_cpus() == host_cpus()
        result = tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
                            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()[0]
    finally:
        ray.shutdown()
    assert result.error is None, result.error
    m = result.metrics
    assert (m["cpus"], m["slice_cpus"], m["slice_gpus"], m["device"]) == (1, 1.0, 0.0, "cpu")
    assert (m["rollouts"], m["data"], m["described"], m["groups"]) == (1, 1, 1, 2)


def test_a_trial_on_a_shared_gpu_evaluates_in_one_rollout_group():
    """rollout_groups auto: one group (one policy forward a step) where other trials share the GPU, two
    pipelined groups on a GPU of its own, on the CPU and outside Ray; a number is kept; others are refused."""
    import torch
    from pydantic import ValidationError

    from agents.track import RLSettings, rollout_groups
    from harness.placement import RaySlice

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    quarter, whole = RaySlice(cpus=4, gpus=0.25, gpu_ids=("0",)), RaySlice(cpus=4, gpus=1.0, gpu_ids=("0",))
    auto = RLSettings()
    assert rollout_groups(auto, cuda, quarter) == 1
    assert [rollout_groups(auto, cuda, whole), rollout_groups(auto, cuda, None), rollout_groups(auto, cpu, NO_GPU)] \
        == [2, 2, 2]
    assert rollout_groups(RLSettings(rollout_groups=2), cuda, quarter) == 2
    assert rollout_groups(RLSettings(rollout_groups=1), cpu, None) == 1
    with pytest.raises(ValidationError, match="rollout_groups"):
        RLSettings(rollout_groups=3)


def test_sweep_resources_are_checked_before_any_compute():
    from harness.driver import LocalResources, check_resources
    from harness.sweep_file import Study

    def study(device, gpus):
        return Study(name="s", track="rl", benchmark="cw10", tasks=["window-close"], methods={"full": {}},
                     settings={"device": device}, resources={"cpus_per_trial": 1, "gpus_per_trial": gpus})

    check_resources([study("auto", "auto")], [{"CPU": 2.0, "GPU": 2.0}])
    with pytest.raises(ConfigError, match="Ray places each trial.*use device auto, cuda or cpu"):
        check_resources([study("cuda:1", "auto")], [{"CPU": 2.0, "GPU": 2.0}])
    with pytest.raises(ConfigError, match="its trials hold no GPU"):
        check_resources([study("cuda", 0)], [{"CPU": 2.0, "GPU": 2.0}])
    with pytest.raises(ConfigError, match=r"--cpus 0: this machine lets the sweep use 1\.\."):
        LocalResources(cpus=0).check(None)
    with pytest.raises(ConfigError, match="set where its nodes start"):
        LocalResources(gpus=1).check("127.0.0.1:6379")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--gpus 1: 0 GPU\(s\) are visible here"):
            LocalResources(gpus=1).check(None)


def test_deterministic_kernels_are_switched_on_in_the_process():
    code = ("import os, torch; from harness.randomness import deterministic_kernels; "
            "assert not torch.are_deterministic_algorithms_enabled(); deterministic_kernels(); "
            "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", ":4096:8"]


def test_auto_gpu_share_spreads_a_wave_over_every_gpu():
    """Ray packs fractional GPUs onto one device before the next: the share must make a small wave take
    whole GPUs (spread over all of them) and a large one four per GPU."""
    from harness.placement import auto_gpu_share

    assert auto_gpu_share(6, 8) == 1.0  # six trials, six GPUs, none sharing
    assert auto_gpu_share(12, 8) == 0.5  # every trial at once, two per GPU at most
    assert auto_gpu_share(32, 8) == auto_gpu_share(1000, 8) == auto_gpu_share(24, 1) == 0.25
    assert auto_gpu_share(2, 1) == 0.5 and auto_gpu_share(1, 1) == 1.0
    assert auto_gpu_share(5, 0) == 0.0  # no GPU: CPU trials

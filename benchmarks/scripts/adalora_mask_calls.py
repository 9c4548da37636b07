"""AdaLoRA's budget masking (``_mask_to_budget``) at a git revision against the working tree's: top-level aten
calls and CPU time of one masking, on ViT-Tiny at 64 px with the four block Linears adapted (48 layers, as
ViT-B has), after three training steps' sensitivities (issue 21). Usage, from the repository root:

    python benchmarks/scripts/adalora_mask_calls.py REV
"""
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import timm  # noqa: E402

from harness.bench_methods import top_level_aten_call  # noqa: E402
from harness.methods import MethodContext, get_method  # noqa: E402
from harness.methods import peft_methods as current  # noqa: E402
from harness.methods.base import AdapterSite  # noqa: E402


def module_at(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:harness/methods/peft_methods.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "peft_methods_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("harness.methods.peft_methods_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(rev: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    site = AdapterSite(targets=("qkv", "proj", "fc1", "fc2"), head=("head",), feedforward=("fc1", "fc2"))
    method = get_method("adalora")
    wrapped = method.wrap(model, site, method.resolve_settings({"r": 8, "tinit": 0.0, "tfinal": 0.0}),
                          MethodContext(total_steps=1000))
    x = torch.randn(4, 3, 64, 64)
    for step in range(3):
        wrapped(x).sum().backward()
        current.adalora_update_and_allocate(wrapped, step)
        wrapped.zero_grad(set_to_none=False)
    alloc, inner = wrapped.base_model.rankallocator, wrapped.base_model.model
    saved = {n: p.detach().clone() for n, p in inner.named_parameters() if "lora_E" in n}
    patterns = {}
    for label, fn in ((rev, module_at(rev)._mask_to_budget), ("working tree", current._mask_to_budget)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            patterns[label] = fn(alloc, inner, alloc.init_bgt - 50)
        calls = sum(map(top_level_aten_call, prof.events()))
        times = []
        for _ in range(20):
            started = time.perf_counter()
            fn(alloc, inner, alloc.init_bgt - 50)
            times.append(time.perf_counter() - started)
        print(f"{label}: {calls} top-level aten calls, {min(times) * 1e3:.2f} ms (best of 20, CPU)")
        with torch.no_grad():
            for n, p in inner.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    print("same rank pattern:", patterns[rev] == patterns["working tree"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "HEAD")

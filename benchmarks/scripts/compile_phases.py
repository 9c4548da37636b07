"""Where a compiled trial's first updates go (issue 20, item 4): a LoRA-wrapped paper DT's training loss compiled
in a fresh own_frame N times in one process (argument N, default 2), as a reused actor's trials compile it;
prints each compile's wall time and dynamo's cumulative phase times. From the project root:
``python benchmarks/scripts/compile_phases.py 3``."""
import os, time, sys
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/compile-phases-inductor")  # empty at a first run: cold
import torch
from torch._dynamo.utils import compile_times
from agents.dt import DTConfig, DecisionTransformer, batch_loss
from agents.bench import random_episodes
from agents.data import WindowSampler
from harness.training import own_frame, autocast
from peft import LoraConfig, get_peft_model
torch.set_num_threads(2)
cfg = DTConfig(n_layer=4, n_head=8, n_embd=512, context=50, dropout=0.1)
batch = WindowSampler(random_episodes(20, cfg), cfg.context, seed=0, device=torch.device("cpu")).sample(4)
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    model = DecisionTransformer(cfg)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["qkv", "proj", "fc1", "fc2"]))
    model.train()
    def loss(b, model=model):
        return batch_loss(model, b)
    fn = torch.compile(own_frame(loss, f"trial_{i}"))
    t = time.perf_counter(); l = fn(batch); t1 = time.perf_counter(); l.backward(); t2 = time.perf_counter()
    print(f"trial {i}: forward+compile {t1-t:.1f} s, backward(+compile) {t2-t1:.1f} s", flush=True)
    print(compile_times(repr="str", aggregate=True)[:1500], flush=True)

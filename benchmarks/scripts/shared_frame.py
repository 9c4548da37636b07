"""Whether trials of one process could share one compiled training loss (issue 20, item 4): the loss takes
the model as an argument and is compiled once; three LoRA-wrapped paper DTs of the same structure, built
one after another as a reused actor's trials build them, run through it. Dynamo's counting backend says how
many frames it compiled (1: no recompile for the later models). From the project root:
``python benchmarks/scripts/shared_frame.py``."""
import time

import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.testing import CompileCounter

from agents.bench import random_episodes
from agents.data import WindowSampler
from agents.dt import DTConfig, DecisionTransformer, batch_loss

torch.set_num_threads(2)
cfg = DTConfig(n_layer=4, n_head=8, n_embd=512, context=50, dropout=0.1)
batch = WindowSampler(random_episodes(20, cfg), cfg.context, seed=0, device=torch.device("cpu")).sample(4)
counter = CompileCounter()


def loss(model, b):
    return batch_loss(model, b)


step = torch.compile(loss, backend=counter)
for i in range(3):
    model = get_peft_model(DecisionTransformer(cfg), LoraConfig(r=8, target_modules=["qkv", "proj", "fc1", "fc2"]))
    model.train()
    t = time.perf_counter()
    step(model, batch).backward()
    print(f"model {i}: frames compiled so far {counter.frame_count}, first step {time.perf_counter() - t:.2f} s")

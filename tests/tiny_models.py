"""A tiny two-block MLP with named Linears and a head: the smallest model every method can wrap."""

from __future__ import annotations

import torch
from torch import nn

from harness.methods import AdapterSite

SITE = AdapterSite(targets=("fc1", "fc2"), head=("head",))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tiny(nn.Module):
    def __init__(self, d: int = 16, depth: int = 2, out: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, out)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)

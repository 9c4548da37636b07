"""EVA's initialisation with the harness's input keys gives what peft's own hash gives."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft.tuners.lora.eva import HashHook
from torch import nn

from harness.methods import AdapterSite, MethodContext, get_method
from harness.methods.eva_init import fast_input_keys, input_key

PEFT_HASH = HashHook.__dict__["hash_fn"].__func__


def test_input_key_groups_inputs_as_peft_hash_does():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g)
    changed = a.clone()
    changed[3, 2] += 1e-6
    zeros, negative = torch.zeros(4, 3), -torch.zeros(4, 3)
    with_nan = a.clone()
    with_nan[0, 0] = float("nan")
    cases = {
        "a": a, "clone": a.clone(), "reshaped": a.reshape(5, 6), "transposed copy": a.t().contiguous(),
        "one value changed": changed, "bf16": a.to(torch.bfloat16), "bf16 as fp32": a.to(torch.bfloat16).float(),
        "fp64": a.double(), "zeros": zeros, "negative zeros": negative, "ints": torch.arange(12), "ints as floats": torch.arange(12).float(),
    }
    pairs = 0
    for (n1, x), (n2, y) in itertools.combinations(cases.items(), 2):
        peft_equal = PEFT_HASH(x) == PEFT_HASH(y)
        assert (input_key(x) == input_key(y)) == peft_equal, (n1, n2, peft_equal)
        pairs += peft_equal
    # the cases hold equal pairs (clone, reshape, dtype casts, signed zeros, ints), not only unequal ones
    assert pairs >= 6
    # peft's verdict on NaNs depends on where Python allocates each NaN float; the key's: same places
    assert input_key(with_nan) == input_key(with_nan.clone()) == input_key(with_nan.double())
    assert input_key(with_nan) != input_key(a)
    # peft's ``view(-1)`` refuses a non-contiguous input; the key reads it as its values
    assert input_key(a.t()) == input_key(a.t().contiguous()) != input_key(a)


class SharedInput(nn.Module):
    """q and k read the same tensor (EVA computes one SVD for them); v reads another."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.q(x) * self.k(x) + self.v(torch.tanh(x)))


def _eva(use_fast: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    torch.manual_seed(0)
    model = SharedInput()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    ctx = MethodContext(total_steps=10, init_batches=lambda: [x[i:i + 16] for i in range(0, 64, 16)],
                        forward_fn=lambda m, b: m(b))
    method = get_method("eva")
    site = AdapterSite(targets=("q", "k", "v"), head=("head",))
    with fast_input_keys(enabled=use_fast) as used:
        assert used is use_fast
        wrapped = method.wrap(model, site, method.resolve_settings({"r": 4, "rho": 2.0}), ctx)
    state = {k: v.detach().clone() for k, v in wrapped.state_dict().items() if "lora_" in k}
    return state, method.describe(wrapped)["rank_per_layer"]


def test_eva_initialisation_equals_peft_own():
    fast, fast_ranks = _eva(True)
    slow, slow_ranks = _eva(False)
    assert fast.keys() == slow.keys() and fast_ranks == slow_ranks
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=0, atol=0, msg=key)
    # the shared input was found: k took q's components (a missed group would run its own PCA)
    a_q = next(v for k, v in fast.items() if ".q.lora_A" in k)
    a_k = next(v for k, v in fast.items() if ".k.lora_A" in k)
    a_v = next(v for k, v in fast.items() if ".v.lora_A" in k)
    rows = min(len(a_q), len(a_k))
    torch.testing.assert_close(a_q[:rows], a_k[:rows], rtol=0, atol=0)
    assert not torch.equal(a_q[:min(rows, len(a_v))], a_v[:min(rows, len(a_v))])


def test_input_keys_are_peft_own_again_after_the_block():
    with fast_input_keys(enabled=True):
        assert HashHook.hash_fn is input_key
        with pytest.raises(RuntimeError):
            with fast_input_keys(enabled=True):
                raise RuntimeError("a failing initialisation")
    assert HashHook.__dict__["hash_fn"].__func__ is PEFT_HASH

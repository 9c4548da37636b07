"""GLoRA (Chavan et al. 2023): a supernet of per-layer adapter forms, evolutionary search, re-parameterised merge.

Every targeted frozen Linear (W0: d_out x d_in, b0) gets shared storage of supernet rank r = max(ranks):
A_d, B_d (d_out x r), A_u, B_u (r x d_in), C_d (d_in x r), C_u (r x 1), D, E (d_out). A layer's *form*
picks, for each of A..E, how it is read from that storage (the authors' public code, ViT-Slim ``GLoRA/``):

    A, B: "lora<r1>" = X_d[:, :r1] @ X_u[:r1] | "vector" = X_d[:, 0] as a column | "scalar" = X_d[0, 0] | "none"
    C:    "lora<r1>" = C_d[:, :r1] @ C_u[:r1] (d_in x 1) | "vector" = C_d[:, 0] | "none"
    D, E: "vector" = the whole vector | "scalar" = its first element | "none"

    W' = W0 + W0 * A + B   (elementwise, broadcast)     b' = b0 + b0 * D + E  (E alone when there is no b0)
    p  = W0 @ C                                          y  = x W'^T + b' + p

With one LoRA rank: 4 x 4 x 3 x 3 x 3 = 432 forms per layer (the paper's count); each further rank in
``ranks`` adds one LoRA choice for A, B and C (ranks {8, 4}: 5 x 5 x 4 x 3 x 3 = 900). A_d, B_d, C_d, D, E start at zero and A_u, B_u,
C_u Xavier-uniform, so every form is the identity at step 0.

Life cycle here:
- training (``subnet`` None): each layer draws one form uniformly (each of A..E independently) at every
  forward pass in training mode, on the device from torch's generator; the form is a tensor of choice
  indices, so a compiled step is compiled once for every form (``GLoRALinear``). In eval mode an unfixed layer uses its largest form (max-rank LoRA for
  A, B, C; vector for D, E), so evaluations during training are deterministic.
- ``finalize``: the evolutionary search of the code (population 50, 20 generations, parents from the top
  10, 25 mutants with per-choice probability 0.2, 25 crossovers, random top-up, candidates seen before
  skipped, candidates outside [param_budget_min, param_budget_max] rejected before scoring), scored with
  ``ctx.validate`` (validation, higher is better) and the inherited supernet weights; the best subnet is
  then fixed in every layer (no retraining). ``search=False``: the largest form is fixed instead.
- ``subnet`` set ("largest", "random", one form for every layer, e.g. "A=lora4,B=vector,C=none,D=scalar,
  E=vector", or a mapping of every adapted layer to its form, as a search records it): the subnet is fixed at
  wrap time, no sampling and no search. Under select-then-final the driver hands the subnet that the
  selection trial searched on the validation split to the final stage this way (``final_settings``), so
  the final stage, which trains on train+val, never scores candidates on data it trained on.
- Parameter budget (``param_budget_min``/``param_budget_max``, the adapter alone, head apart, by the
  formula of ``count``): candidates outside it are never scored. A budget that no subnet can meet, or that
  random draws almost never meet (the search starts from random draws), is refused by ``check_fit``
  before any compute, from the layers' shapes alone.
- ``count``: the fixed subnet's parameters by the paper's per-layer formula (A or B as LoRA r1:
  r1 (d_in + d_out), vector d_out, scalar 1; C as LoRA r1 (d_in + 1), vector d_in; D, E vector d_out,
  scalar 1), not the supernet storage. An unfixed layer counts its largest form, which equals its storage.
- ``merge``: W' and b' + p written into a plain Linear.
"""

from __future__ import annotations

import json
import random
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.methods.base import AdapterSite, MethodContext, Setting, check_rank, count_trainable, method_state
from harness.methods.glora_search import (TENSORS, Candidate, LayerForm, SearchConfig,
                                          evolutionary_search, form_choices, form_params, largest_form, lora_rank)
from harness.methods.adapted_layers import AdaptedLinear, LayerBuilder, LinearAdapterMethod

_SUBNET_FILE = "glora_subnet.json"
_SEARCH_KEY = "glora_search"  # method_state key of the SearchResult
# The stacked frozen weights of a group of layers (``GLoRALinear.group_operands`` on CUDA), by its first layer:
# (the weights' identities and versions, the stack). Outside the model, so that no copy of a model (a save,
# a pickle) carries it; rebuilt when a weight is replaced or changed in place.
_FROZEN_STACKS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _stacked_frozen(layers: Sequence["GLoRALinear"]) -> torch.Tensor:
    """The layers' frozen W0 stacked (G x d_out x d_in), kept between forwards: one copy of the adapted
    weights, against a weight-sized stack at every step."""
    key = tuple((layer.base.weight.data_ptr(), layer.base.weight._version) for layer in layers)
    cached = _FROZEN_STACKS.get(layers[0])
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = _FROZEN_STACKS[layers[0]] = (key, torch.stack([layer.base.weight for layer in layers]))
    return cached[1]


class GLoRALinear(AdaptedLinear):
    """A frozen Linear with GLoRA's shared storage; ``form`` fixed, or sampled per forward when None.

    The forward reads the form from tensors, never from Python: each tensor's choice is an index into a
    small table (a 0/1 mask over the storage rank for its LoRA forms, a gate for its vector form and one
    for its scalar form), so every form is the same arithmetic on the same shapes and one compiled graph
    serves them all (branching on the form made torch.compile specialise on it and recompile at nearly
    every sampled form). Unused storage gets zero gradients where the branches gave it none.
    In training with no fixed form, the indices are drawn on the device from torch's generator (uniform
    over each tensor's choices, independently per layer and per forward).
    """

    adapter_tensors = ("A_d", "A_u", "B_d", "B_u", "C_d", "C_u", "D", "E")

    def __init__(self, base: nn.Linear, ranks: Sequence[int]):
        super().__init__(base)
        self.ranks = tuple(ranks)
        self.choices = form_choices(self.ranks)
        r = max(self.ranks)
        d_in, d_out = base.in_features, base.out_features
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.A_d = nn.Parameter(torch.zeros(d_out, r, **kw))
        self.A_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, d_in, **kw)))
        self.B_d = nn.Parameter(torch.zeros(d_out, r, **kw))
        self.B_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, d_in, **kw)))
        self.C_d = nn.Parameter(torch.zeros(d_in, r, **kw))
        self.C_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, 1, **kw)))
        self.D = nn.Parameter(torch.zeros(d_out, **kw))
        self.E = nn.Parameter(torch.zeros(d_out, **kw))
        # Per tensor, one row per choice: [rank mask (r) | vector gate | scalar gate]; never saved.
        for t in TENSORS:
            self.register_buffer(f"_table_{t}", self._table(self.choices[t], r, **kw), persistent=False)
        counts = [float(len(self.choices[t])) for t in TENSORS]
        self.register_buffer("_counts", torch.tensor(counts, device=kw["device"]), persistent=False)
        self.register_buffer("_top", self._counts.long() - 1, persistent=False)  # each tensor's last index
        self.register_buffer("_code", torch.zeros(len(TENSORS), dtype=torch.long, device=kw["device"]),
                             persistent=False)  # the fixed form's indices (the largest form when unfixed)
        self.register_buffer("_last", torch.zeros_like(self._code), persistent=False)  # the last forward's
        # The eager forward's gates, never saved: for A, B, C per choice three (r, 1) columns [rank mask |
        # vector gate on rank 0 | scalar gate on rank 0], for D, E per choice [vector gate, scalar gate] as
        # (1,) tensors; one lookup and one unbind each give every gate as an operand of a fused product.
        matrices, vectors = self._gate_tables(r, **kw)
        self.register_buffer("_gates", matrices, persistent=False)
        self.register_buffer("_vector_gates", vectors, persistent=False)
        self.register_buffer("_rows", torch.arange(3, device=kw["device"]), persistent=False)
        self.form = None
        # inference's (key, W', b'): built once per form and weights in eval mode without grad (forward)
        self._inference: tuple | None = None

    @staticmethod
    def _table(choices: Sequence[str], r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        table = torch.zeros(len(choices), r + 2, dtype=dtype, device=device)
        for i, form in enumerate(choices):
            if form.startswith("lora"):
                table[i, :lora_rank(form)] = 1
            elif form == "vector":
                table[i, r] = 1
            elif form == "scalar":
                table[i, r + 1] = 1
        return table

    def _gate_tables(self, r: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        most = max(len(self.choices[t]) for t in TENSORS)
        matrices = torch.zeros(3, most, 3, r, 1, dtype=dtype, device=device)  # A, B, C
        vectors = torch.zeros(2, most, 2, 1, dtype=dtype, device=device)  # D, E
        for i, t in enumerate(TENSORS):
            row = self._table(self.choices[t], r, dtype, device)
            n = row.shape[0]
            if i < 3:
                matrices[i, :n, 0, :, 0] = row[:, :r]
                matrices[i, :n, 1, 0, 0] = row[:, r]
                matrices[i, :n, 2, 0, 0] = row[:, r + 1]
            else:
                vectors[i - 3, :n, :, 0] = row[:, r:]
        return matrices, vectors

    @property
    def form(self) -> LayerForm | None:
        return self._form

    @form.setter
    def form(self, form: LayerForm | None) -> None:
        self._form = form
        # a plain bool for the forward: torch.compile guards on its value (two graphs at most), where a
        # guard on the form object itself would recompile at every new form
        self._sampling = form is None
        code = self._encode(form if form is not None else largest_form(self.ranks))
        with torch.no_grad():
            self._code.copy_(code)

    def _encode(self, form: LayerForm) -> torch.Tensor:
        return torch.tensor([self.choices[t].index(getattr(form, t)) for t in TENSORS], dtype=torch.long)

    def _decode(self, code: torch.Tensor) -> LayerForm:
        return LayerForm(**{t: self.choices[t][int(i)] for t, i in zip(TENSORS, code.tolist())})

    def random_form(self, rng: random.Random) -> LayerForm:
        return LayerForm(**{t: rng.choice(self.choices[t]) for t in TENSORS})

    def active_form(self) -> LayerForm:
        """The fixed form; else, in training mode, the form the last training forward drew (reads it back
        from the device), and in eval mode the largest form, which an unfixed layer evaluates with."""
        if self.form is not None:
            return self.form
        if self.training:
            return self._decode(self._last)
        return largest_form(self.ranks)

    @staticmethod
    def _matrix(form: str, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        if form.startswith("lora"):
            r1 = lora_rank(form)
            return down[:, :r1] @ up[:r1]
        if form == "vector":
            return down[:, :1]  # a column: broadcast along each row
        if form == "scalar":
            return down[0, 0]
        return None

    @staticmethod
    def _vector(form: str, v: torch.Tensor) -> torch.Tensor | None:
        return {"vector": v, "scalar": v[:1], "none": None}[form]

    def effective(self, form: LayerForm) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b' + p) of ``form``: the weight and bias of the equivalent plain Linear, written per form
        (the reference the forward's table form is tested against; merges use it)."""
        w0, b0 = self.base.weight, self.base.bias
        weight = w0
        a = self._matrix(form.A, self.A_d, self.A_u)
        if a is not None:
            weight = weight + w0 * a
        b = self._matrix(form.B, self.B_d, self.B_u)
        if b is not None:
            weight = weight + b
        bias = b0 if b0 is not None else torch.zeros(w0.shape[0], dtype=w0.dtype, device=w0.device)
        d = self._vector(form.D, self.D)
        if d is not None and b0 is not None:
            bias = bias + b0 * d
        e = self._vector(form.E, self.E)
        if e is not None:
            bias = bias + e
        c = self._matrix(form.C, self.C_d, self.C_u)
        if c is not None:
            bias = bias + (w0 @ c).squeeze(-1)  # the prompt p = W0 @ C
        return weight, bias

    def _codes(self) -> torch.Tensor:
        if self._sampling and self.training:
            code = (torch.rand(self._counts.shape, device=self._counts.device) * self._counts).long()
            code = torch.minimum(code, self._top)  # rand < 1, but never trust a float edge
            self._last.copy_(code)
            return code
        return self._code

    def effective_coded(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b' + p) of the form whose choice indices are ``code`` (5,), as fixed-shape arithmetic."""
        if not torch.compiler.is_compiling():
            return self._effective_eager(code)
        # Compiled (inductor fuses the element-wise work, so the dispatch count does not matter here):
        r = self.A_d.shape[1]
        # index_select with 1-element index tensors: a 0-d index would be read back as a Python int
        ta, tb, tc, td, te = (getattr(self, f"_table_{t}").index_select(0, code[i:i + 1])[0]
                              for i, t in enumerate(TENSORS))

        def column(t, down):  # the vector or scalar form: one column, broadcast along each row
            return (t[r] * down[:, 0] + t[r + 1] * down[0, 0])[:, None]

        def vector(t, v):
            return t[r] * v + t[r + 1] * v[0]

        w0, b0 = self.base.weight, self.base.bias
        # A's and B's LoRA products (masked to rank r1) as one batched product: compiled, one launch
        # forward and two backward where two and four separate products took their own
        lora = torch.bmm(torch.stack([self.A_d * ta[:r], self.B_d * tb[:r]]), torch.stack([self.A_u, self.B_u]))
        lora_a, lora_b = lora[0], lora[1]
        weight = w0 + w0 * (lora_a + column(ta, self.A_d)) + (lora_b + column(tb, self.B_d))
        # The prompt p = W0 C as sums over W0's rows and C's rank rather than two matrix products:
        # compiled, the row sums read W0 in the same kernel that writes W' (one pass over the weight
        # instead of a separate product), and C's rank-r sum fuses with its gate, which removes two
        # of the layer's matrix-product launches from the forward and two from the backward. Eager
        # (``_effective_eager``), the products stay: there the sums would materialise a weight-sized
        # temporary.
        c = (self.C_d * (tc[:r] * self.C_u[:, 0])).sum(1) + tc[r] * self.C_d[:, 0]
        prompt = (w0 * c).sum(1)
        bias = vector(te, self.E) + prompt
        if b0 is not None:
            bias = bias + b0 + b0 * vector(td, self.D)
        return weight, bias

    def _effective_eager(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``effective_coded`` in about a third of the dispatches (an eager step is bound by them): each
        tensor's mask and vector gate fold into its up factor (X_d @ (m * X_u + v e0) is the masked LoRA
        product plus the vector form's column), and its scalar form (X_d[0, 0] times the gate) is the
        bias of the same addmm; W0 + W0 * A is one addcmul, D's and E's gates one addcmul each."""
        ma, xa, ya, mb, xb, yb, mc, xc, _ = self._gates[self._rows, code[:3]].flatten(0, 1).unbind(0)
        vd, sd, ve, se = self._vector_gates[self._rows[:2], code[3:]].flatten(0, 1).unbind(0)

        def vector(v, vector, scalar):  # the vector form v, or its first element broadcast
            return torch.addcmul(v[:1] * scalar, v, vector)

        with torch.autocast(self.A_d.device.type, enabled=False):  # see _assemble
            return self._assemble(torch.addcmul(xa, ma, self.A_u), self.A_d[:1] @ ya,
                                  torch.addcmul(xb, mb, self.B_u), self.B_d[:1] @ yb,
                                  self.C_d @ torch.addcmul(xc, mc, self.C_u), vector(self.E, ve, se),
                                  vector(self.D, vd, sd) if self.base.bias is not None else None)

    def _assemble(self, up_a: torch.Tensor, scalar_a: torch.Tensor, up_b: torch.Tensor, scalar_b: torch.Tensor,
                  c: torch.Tensor, e: torch.Tensor, d: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b' + p) from the form's small terms: A's and B's gated up factors (r x d_in) and scalar
        terms (1 x 1), C (d_in x 1), E and D (d_out; D None without a base bias). The weight-sized work is
        here, per layer: A = A_d @ up_a + scalar_a, B likewise, then ((W0 + W0 * A) + B), the order of
        ``effective``, so the two round alike.

        Eager, all of it runs in the weights' dtype with autocast off: under bf16 autocast every product
        here copied its operands to bf16 first (the frozen W0 of the prompt's product, weight-sized, at
        every forward: autocast caches only the casts of trainable leaves), some 20 more dispatches per
        layer, and W0 + W0 * A came back in fp32 anyway; the layer's own ``F.linear`` then casts W' once."""
        w0, b0 = self.base.weight, self.base.bias
        with torch.autocast(w0.device.type, enabled=False):
            weight = torch.addcmul(w0, w0, torch.addmm(scalar_a, self.A_d, up_a)) + torch.addmm(scalar_b, self.B_d, up_b)
            bias = e + (w0 @ c).squeeze(1)  # a product, as ``effective`` computes the prompt
            if b0 is not None:
                bias = torch.addcmul(bias + b0, b0, d)
        return weight, bias

    def group_key(self) -> tuple | None:
        if not (self.training or torch.is_grad_enabled()):
            return None  # inference reuses its cached W' (forward): nothing to prepare per forward
        return (self.ranks, self.in_features, self.out_features, self.base.bias is not None, self.A_d.dtype,
                self.A_d.device, self._sampling and self.training)

    @classmethod
    def before_groups(cls, layers: Sequence["GLoRALinear"]) -> None:
        """Draw the forms of every sampling layer (training, no fixed form) for this forward into its
        ``_last``: one ``rand`` of n x 5 in module order where the layers share their choices, which on the
        CPU gives the numbers n per-layer draws would (``_codes``), on a GPU other but equally uniform ones."""
        drawing = [layer for layer in layers if layer._sampling and layer.training]
        if not drawing:
            return
        first = drawing[0]
        if any(layer.ranks != first.ranks or layer._counts.device != first._counts.device for layer in drawing):
            for layer in drawing:
                layer._codes()
            return
        codes = torch.rand((len(drawing), len(TENSORS)), device=first._counts.device) * first._counts
        codes = torch.minimum(codes.long(), first._top)
        torch._foreach_copy_([layer._last for layer in drawing], list(codes.unbind(0)))

    @classmethod
    def group_operands(cls, layers: Sequence["GLoRALinear"]) -> list[tuple]:
        """For all ``layers`` (one shape, one kind of form: all drawn or all fixed) the small terms of their
        forms (gated up factors, scalar terms, C, E, D) as batched products over their stacked storage, in
        the eager forward's arithmetic (``_effective_eager``), and where :meth:`batched_weights` says so
        their W' and b' + p as well (``("weight", W', b')`` per layer; else ``("terms", ...)`` for
        ``_assemble``). Drawn forms are in ``_last`` (``before_groups``)."""
        first, g = layers[0], len(layers)
        codes = torch.stack([layer._last if first._sampling and first.training else layer._code for layer in layers])
        # (G, 3 tensors, 3 gates, r, 1) -> 9 gates of (G, r, 1); (G, 2, 2, 1) -> 4 of (G, 1)
        ma, xa, ya, mb, xb, yb, mc, xc, _ = (first._gates[first._rows, codes[:, :3]].permute(1, 2, 0, 3, 4)
                                             .flatten(0, 1).unbind(0))
        vd, sd, ve, se = first._vector_gates[first._rows[:2], codes[:, 3:]].permute(1, 2, 0, 3).flatten(0, 1).unbind(0)

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([getattr(layer, name) for layer in layers])

        def vector(v, vector, scalar):  # (G, d_out)
            v = stacked(v)
            return torch.addcmul(v[:, :1] * scalar, v, vector)

        with torch.autocast(first.A_d.device.type, enabled=False):  # fp32, as ``_assemble``
            up_a = torch.addcmul(xa, ma, stacked("A_u"))
            up_b = torch.addcmul(xb, mb, stacked("B_u"))
            a_d, b_d = stacked("A_d"), stacked("B_d")
            scalar_a, scalar_b = torch.bmm(a_d[:, :1], ya), torch.bmm(b_d[:, :1], yb)
            c = torch.bmm(stacked("C_d"), torch.addcmul(xc, mc, stacked("C_u")))
            e = vector("E", ve, se)
            d = vector("D", vd, sd) if first.base.bias is not None else None
            if cls.batched_weights(first):
                w0 = _stacked_frozen(layers)
                weight = torch.addcmul(w0, w0, torch.bmm(a_d, up_a) + scalar_a) + (torch.bmm(b_d, up_b) + scalar_b)
                bias = e + torch.bmm(w0, c).squeeze(-1)
                if d is not None:
                    b0 = torch.stack([layer.base.bias for layer in layers])
                    bias = torch.addcmul(bias + b0, b0, d)
                device = weight.device.type
                if torch.is_autocast_enabled(device):
                    # the cast each layer's F.linear would make, once for the group; only the cast W'
                    # then waits for its layer, in half the memory
                    dtype = torch.get_autocast_dtype(device)
                    weight, bias = weight.to(dtype), bias.to(dtype)
                return [("weight", w, b) for w, b in zip(weight.unbind(0), bias.unbind(0))]
        d = d.unbind(0) if d is not None else (None,) * g
        return [("terms", *terms) for terms in zip(up_a.unbind(0), scalar_a.unbind(0), up_b.unbind(0),
                                                    scalar_b.unbind(0), c.unbind(0), e.unbind(0), d)]

    # Whether a group builds its layers' W' in batched products too (True/False), or only on CUDA (None).
    # There the G weight-sized gradients that the backward stacks cost a fraction of a millisecond, and each
    # layer is left with its F.linear alone; on a CPU that copy cost more than the dispatches it saved (a
    # profile of ViT-Tiny), so each layer assembles its own W' from the batched terms (``_assemble``).
    BATCHED_WEIGHTS: bool | None = None

    @classmethod
    def batched_weights(cls, layer: "GLoRALinear") -> bool:
        return layer.base.weight.is_cuda if cls.BATCHED_WEIGHTS is None else cls.BATCHED_WEIGHTS

    def _inference_key(self) -> tuple:
        """What the effective weight of an inference forward depends on: every tensor it reads (storage
        and version: a form set, an optimizer step or a load changes them in place) and the autocast state."""
        tensors = [self._code, self.base.weight, *([self.base.bias] if self.base.bias is not None else []),
                   *(getattr(self, t) for t in self.adapter_tensors)]
        autocast = tuple(torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d) for d in ("cuda", "cpu"))
        return tuple((t.data_ptr(), t._version) for t in tensors), autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._inference = None
            prepared = self.take_operands()
            if prepared is None:
                weight, bias = self.effective_coded(self._codes())
            elif prepared[0] == "weight":
                weight, bias = prepared[1:]
            else:
                weight, bias = self._assemble(*prepared[1:])
        else:
            # Inference (rollouts, the subnet search's scoring): the form and weights stay fixed across
            # forwards, so W' and b' are built once, not again for every step of every episode
            key = self._inference_key()
            cached = self._inference
            if cached is None or cached[0] != key:
                cached = self._inference = (key, *self.effective_coded(self._codes()))
            weight, bias = cached[1], cached[2]
        return F.linear(x, weight, bias)

    def train(self, mode: bool = True):
        self._inference = None  # training changes the weights: no stale W' kept
        return super().train(mode)

    def merged_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        form = self.form if self.form is not None else largest_form(self.ranks)
        return self.effective(form)

    def params_of(self, form: LayerForm) -> int:
        return form_params(form, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"ranks={list(self.ranks)}, form={self.form.text() if self.form else 'sampled'}"


def _ranks(settings: dict[str, Any]) -> tuple[int, ...]:
    ranks = settings["ranks"]
    if isinstance(ranks, int):
        ranks = (ranks,)
    try:
        out = tuple(sorted({int(r) for r in ranks}, reverse=True))
    except (TypeError, ValueError):
        raise ConfigError(f"method 'glora' setting 'ranks'={ranks!r}: expected a list of positive integers, "
                          "e.g. [8, 4]") from None
    if not out or min(out) < 1:
        raise ConfigError(f"method 'glora' setting 'ranks'={ranks!r}: expected a non-empty list of positive "
                          "integers, e.g. [8, 4] (the paper's supernets: [8, 4], [4, 2], [2])")
    return out


def _layer_forms(subnet: dict[str, Any], layers: list[str], choices: dict[str, tuple[str, ...]]
                 ) -> dict[str, LayerForm]:
    """A per-layer subnet ({layer name: form text}) parsed, covering exactly the adapted layers."""
    missing, unknown = sorted(set(layers) - set(subnet)), sorted(set(subnet) - set(layers))
    if missing or unknown:
        raise ConfigError(f"method 'glora' setting 'subnet': a per-layer subnet must name every adapted layer "
                          f"and no other; missing {missing[:3]}, unknown {unknown[:3]} (adapted layers: "
                          f"{layers[:3]}...)")
    forms = {}
    for name, text in subnet.items():
        if not isinstance(text, str):
            raise ConfigError(f"method 'glora' setting 'subnet': layer {name!r} has {text!r}; give its form as "
                              "text, e.g. 'A=lora4,B=vector,C=none,D=scalar,E=vector'")
        forms[name] = LayerForm.parse(text, choices)
    return forms


BUDGET_DRAWS = 100  # random draws per population member the search may spend on its first generation


def check_budget(shapes: list[tuple[str, int, int]], ranks: Sequence[int], budget_min: float,
                 budget_max: float | None, population: int) -> None:
    """Refuse, before any compute, a parameter budget the search cannot work with: no subnet inside it, or
    so few that random draws (how the search starts) would not find one. ``shapes``: (name, d_in, d_out)
    of every adapted layer."""
    none = LayerForm("none", "none", "none", "none", "none")
    smallest = sum(form_params(none, i, o) for _, i, o in shapes)
    largest = sum(form_params(largest_form(ranks), i, o) for _, i, o in shapes)
    where = f"subnets of ranks {list(ranks)} on these layers have {smallest} to {largest} parameters"
    if budget_max is not None and budget_min > budget_max:
        raise ConfigError(f"method 'glora': param_budget_min={budget_min} is above param_budget_max={budget_max}")
    if budget_min > largest or (budget_max is not None and budget_max < smallest):
        raise ConfigError(f"method 'glora': no subnet fits the parameter budget [{budget_min}, {budget_max}]; "
                          f"{where}. Give a budget inside that range, or other 'ranks'")
    if budget_min <= smallest and (budget_max is None or budget_max >= largest):
        return  # every subnet fits
    choices = form_choices(ranks)
    rng = random.Random(0)
    draws = population * BUDGET_DRAWS
    for _ in range(draws):
        n = sum(form_params(LayerForm(**{t: rng.choice(choices[t]) for t in TENSORS}), i, o) for _, i, o in shapes)
        if n >= budget_min and (budget_max is None or n <= budget_max):
            return
    raise ConfigError(f"method 'glora': random subnets almost never fall inside the parameter budget "
                      f"[{budget_min}, {budget_max}] (none in {draws} draws), and the search starts from random "
                      f"draws; {where}. Widen the budget or choose 'ranks' whose typical subnet is nearer it")


class GLoRA(LinearAdapterMethod):
    name = "glora"
    summary = ("GLoRA (Chavan et al. 2023): per-layer supernet of LoRA/vector/scalar/none forms for W0*A + B, "
               "the prompt W0 C and the bias D, E; evolutionary search under a parameter budget; merges into W")
    layer_class = GLoRALinear
    settings = {
        "ranks": Setting((8, 4), "LoRA ranks of the supernet's LoRA forms; storage rank is the largest "
                                 "(the paper's supernets: [8, 4] 0.86M, [4, 2] 0.44M, [2] 0.29M on ViT-B)",
                         kind=(tuple, list, int)),
        "subnet": Setting(None, "None: supernet training then search; 'largest' (alias 'lora-all': max-rank LoRA "
                                "for A, B, C, vector D, E), 'random' (one seeded draw per layer), or one form for "
                                "every layer, e.g. 'A=lora4,B=vector,C=none,D=scalar,E=vector', or a mapping "
                                "{layer name: form} covering every adapted layer (what a search records): fixed "
                                "from the start, no sampling, no search", kind=(str, dict, type(None))),
        "search": Setting(True, "run the evolutionary search after training (needs the track's validation "
                                "scorer); False: fix the largest form in every layer instead"),
        "search_population": Setting(50, "candidates per generation", kind=int, ge=1),
        "search_generations": Setting(20, "generations", kind=int, ge=1),
        "search_parents": Setting(10, "parents drawn from this many best candidates", kind=int, ge=1),
        "search_mutations": Setting(25, "mutants per generation", kind=int, ge=0),
        "search_mutation_prob": Setting(0.2, "probability that a mutant redraws each choice", ge=0),
        "search_crossovers": Setting(25, "crossovers per generation (each choice from either parent)", kind=int,
                                     ge=0),
        "param_budget_min": Setting(0, "fewest parameters a searched subnet may have (absolute count)",
                                    kind=(int, float), ge=0),
        "param_budget_max": Setting(None, "most parameters a searched subnet may have (absolute count; None: "
                                          "no limit)", kind=(int, float, type(None)), ge=0),
    }

    def check_fit(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any]) -> None:
        ranks = _ranks(settings)
        check_rank(model, site, max(ranks), self.name, what="largest rank of 'ranks'")
        shapes = [(n, m.in_features, m.out_features) for n, m in site.target_linears(model)]
        if isinstance(settings["subnet"], dict):
            _layer_forms(settings["subnet"], [n for n, _, _ in shapes], form_choices(ranks))
        elif settings["subnet"] is None and settings["search"]:
            check_budget(shapes, ranks, settings["param_budget_min"], settings["param_budget_max"],
                         int(settings["search_population"]))

    def needs_selection(self, settings: dict[str, Any]) -> bool:
        return settings["subnet"] is None and bool(settings["search"])

    def final_settings(self, settings: dict[str, Any], described: dict[str, Any]) -> dict[str, Any]:
        out = dict(settings)
        subnet = described.get("subnet")
        if self.needs_selection(settings) and isinstance(subnet, dict) and subnet:
            if any(v == "sampled" for v in subnet.values()):
                raise ConfigError("method 'glora': the selection trial recorded no searched subnet (some layers "
                                  "are still 'sampled'); its final stage cannot reuse it")
            out["subnet"] = dict(subnet)
        return out

    def layer_factory(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any],
                      ctx: MethodContext) -> LayerBuilder:
        ranks, spec = _ranks(settings), settings["subnet"]
        self.check_fit(model, site, settings)
        fixed = None  # the form every layer gets; 'random' draws one per layer below
        per_layer: dict[str, LayerForm] = {}
        if isinstance(spec, dict):
            per_layer = _layer_forms(spec, [n for n, _ in site.target_linears(model)], form_choices(ranks))
        elif spec in ("largest", "lora-all"):
            fixed = largest_form(ranks)
        elif spec not in (None, "random"):
            fixed = LayerForm.parse(spec, form_choices(ranks))  # every layer has the same choices
        # The per-forward draws of training come from torch's generator, on the device (seeded by the
        # trial); 'random' subnets draw from their own stream, in module order.
        pick = random.Random(ctx.seed + 1)

        def build(name: str, linear: nn.Linear) -> GLoRALinear:
            layer = GLoRALinear(linear, ranks)
            layer.form = layer.random_form(pick) if spec == "random" else per_layer.get(name, fixed)
            return layer

        return build

    def finalize(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], ctx: MethodContext) -> nn.Module:
        layers = [m for _, m in self.layers(model)]
        if all(m.form is not None for m in layers):
            return model  # a fixed subnet (setting 'subnet') or already searched
        if not settings["search"]:
            for m in layers:
                m.form = largest_form(m.ranks)
            return model
        if ctx.validate is None:
            raise ConfigError("method 'glora': the evolutionary search needs a validation scorer (ctx.validate) "
                              "and the track gave none; set search=False to keep the largest form, or fix a "
                              "subnet with the 'subnet' setting")
        was_training = model.training

        def score(cand: Candidate) -> float:
            for m, f in zip(layers, cand):
                m.form = f
            model.eval()
            with torch.no_grad():
                return float(ctx.validate(model))

        cfg = SearchConfig(population=int(settings["search_population"]),
                           generations=int(settings["search_generations"]),
                           parents=int(settings["search_parents"]), mutations=int(settings["search_mutations"]),
                           mutation_prob=float(settings["search_mutation_prob"]),
                           crossovers=int(settings["search_crossovers"]),
                           budget_min=settings["param_budget_min"], budget_max=settings["param_budget_max"],
                           seed=ctx.seed)
        try:
            best, result = evolutionary_search(layers, score, cfg)
        except ConfigError:
            for m in layers:
                m.form = None
            raise
        for m, f in zip(layers, best):
            m.form = f
        method_state(model)[_SEARCH_KEY] = result
        model.train(was_training)
        return model

    def count(self, model: nn.Module, site: AdapterSite) -> tuple[int, int]:
        # GLoRA layers count their chosen form by the paper's formula, not their whole supernet storage.
        subnet, layer_params = 0, set()
        for _, m in self.layers(model):
            subnet += m.params_of(m.form if m.form is not None else largest_form(m.ranks))
            layer_params.update(id(p) for p in m.parameters())
        own, head = count_trainable(model, site, layer_params)
        return own + subnet, head

    def describe(self, model: nn.Module) -> dict[str, Any]:
        subnet = {n: (m.form.text() if m.form else "sampled") for n, m in self.layers(model)}
        out: dict[str, Any] = {"subnet": subnet}
        result = method_state(model).get(_SEARCH_KEY)
        if result is not None:
            out["search"] = asdict(result)
        return out

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        subnet = {n: (asdict(m.form) if m.form else None) for n, m in self.layers(model)}
        (folder / _SUBNET_FILE).write_text(json.dumps(subnet, indent=1))

    def load_extra(self, model: nn.Module, folder: Path) -> None:
        subnet = json.loads((folder / _SUBNET_FILE).read_text())
        layers = dict(self.layers(model))
        if set(subnet) != set(layers):
            raise ConfigError(f"{folder}: the saved subnet covers layers {sorted(subnet)[:3]}..., the model has "
                              f"{sorted(layers)[:3]}...")
        for name, form in subnet.items():
            layers[name].form = LayerForm(**form) if form else None

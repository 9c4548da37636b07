"""NoLA (Koohpayegani et al., ICLR 2024): LoRA's two factors as trainable mixtures of fixed random bases.

For a frozen Linear ``y = W0 x + b0`` (W0: d_out x d_in) NoLA adds, as the authors' ViT code computes it,

    A = sum_i alpha_i A_i   (A_i: d_in x r,  k bases)
    B = sum_j beta_j  B_j   (B_j: r x d_out, l bases)
    y = W0 x + b0 + (1/r) * (x A) B          i.e.  Delta W = (1/r) (A B)^T

Only alpha (k) and beta (l) train: (k + l) parameters per adapted matrix, whatever its size or the rank.

Choices, following the public code (UCDvision/NOLA, ``vit/NOLA.py``):

- Bases: Kaiming-uniform with a = sqrt(5), i.e. uniform in +-1/sqrt(fan_in), where torch computes the
  fan-in of a (k, d_in, r) tensor as d_in * r and of an (l, r, d_out) tensor as r * d_out. They come
  from a private ``torch.Generator`` on the CPU (so they are the same on every device and never disturb
  the global RNG), are cast to the layer's dtype and device, and live in non-persistent buffers: a save
  stores only the seed and the coefficients, and a load regenerates the bases from the seed.
- Seeds: the authors' code seeds every layer with 0, so layers of the same shape share their bases
  (``shared_bases=True``, the default). With ``shared_bases=False`` layer i uses ``seed + i`` (module
  order). Shared bases are also generated once and shared in memory between same-shape layers.
- Initialisation: both alpha and beta start at 1/k and 1/l, as in the code. The update is therefore
  *not* zero at step 0 (it is the product of the mean bases, small: about 1/sqrt(k l) of a single
  basis product), and both sides get gradients from the first step. ``zero_init=True`` starts beta at 0
  instead (a zero update at step 0, LoRA-style; alpha still gets no gradient until beta moves).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from harness.methods.base import AdapterSite, MethodContext, Setting
from harness.methods.low_rank import low_rank_linear
from harness.methods.adapted_layers import AdaptedLinear, LayerBuilder, LinearAdapterMethod


class NoLALinear(AdaptedLinear):
    """A frozen Linear plus NoLA's update; ``bases_a`` (k, d_in, r) and ``bases_b`` (l, r, d_out) are fixed."""

    adapter_tensors = ("nola_alpha", "nola_beta")

    def __init__(self, base: nn.Linear, bases_a: torch.Tensor, bases_b: torch.Tensor, r: int, seed: int,
                 zero_init: bool = False):
        super().__init__(base)
        k, l = bases_a.shape[0], bases_b.shape[0]
        self.r = r
        self.seed = seed
        self.scale = 1.0 / r
        # Kept as (r d_in, k) and (d_out r, l): one matrix-vector product with the coefficients then yields
        # A^T and B^T, the layouts F.linear takes, with no reshape or transpose per forward (each one more
        # dispatch forward and backward). A view of storage in that layout (as the factory passes, to share
        # it between layers) is kept without a copy. Non-persistent: regenerated from the seed, never saved.
        self.register_buffer("bases_a_t", bases_a.permute(2, 1, 0).reshape(-1, k), persistent=False)
        self.register_buffer("bases_b_t", bases_b.permute(2, 1, 0).reshape(-1, l), persistent=False)
        self._shape = (base.in_features, base.out_features)
        self.register_buffer("_zero", torch.zeros((), dtype=base.weight.dtype, device=base.weight.device),
                             persistent=False)
        dtype, device = base.weight.dtype, base.weight.device
        self.nola_alpha = nn.Parameter(torch.full((k,), 1.0 / k, dtype=dtype, device=device))
        beta0 = 0.0 if zero_init else 1.0 / l
        self.nola_beta = nn.Parameter(torch.full((l,), beta0, dtype=dtype, device=device))

    @property
    def bases_a(self) -> torch.Tensor:
        """The A bases, (k, d_in, r) (a view)."""
        return self.bases_a_t.view(self.r, self._shape[0], -1).permute(2, 1, 0)

    @property
    def bases_b(self) -> torch.Tensor:
        """The B bases, (l, r, d_out) (a view)."""
        return self.bases_b_t.view(self._shape[1], self.r, -1).permute(2, 1, 0)

    def factors_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T: r x d_in, (1/r) B^T: d_out x r): the coefficients are contracted with the bases first, so no
        per-token work scales with k or l."""
        d_in, d_out = self._shape
        # Matrix-vector products in the coefficients' dtype with autocast off: under bf16 autocast every
        # forward would first copy all k + l bases to bf16, and sum k products in bf16.
        with torch.autocast(self.bases_a_t.device.type, enabled=False):
            if torch.compiler.is_compiling():
                # Compiled, the same products as (1 x k) @ (k x r d_in) matrix products: inductor lowers
                # those to BLAS calls, whereas it rewrites mv/addmv as an element-wise product and a sum,
                # generated reduction kernels in the forward and the backward (compiled ViT-Tiny step, CPU:
                # 1052 kernels against 764; benchmarks/scripts/compiled_graph_count.py). The bases'
                # transposes are views that BLAS reads as they are. The 1/r scale goes on the l
                # coefficients, the smallest operand.
                a_t = (self.nola_alpha.unsqueeze(0) @ self.bases_a_t.T).view(self.r, d_in)
                b_t = ((self.nola_beta * self.scale).unsqueeze(0) @ self.bases_b_t.T).view(d_out, self.r)
                return a_t, b_t
            a_t = torch.mv(self.bases_a_t, self.nola_alpha).view(self.r, d_in)
            # the 1/r scale in the same product (alpha), where a separate multiply was one more dispatch
            b_t = torch.addmv(self._zero, self.bases_b_t, self.nola_beta, beta=0, alpha=self.scale)
            b_t = b_t.view(d_out, self.r)
        return a_t, b_t

    def group_key(self) -> tuple | None:
        # only layers reading the same bases (shared_bases: every layer of one shape) share a product
        return (self.bases_a_t.data_ptr(), self.bases_b_t.data_ptr(), self.r, self._shape,
                self.nola_alpha.dtype, self.nola_alpha.device)

    @classmethod
    def group_operands(cls, layers: Sequence["NoLALinear"]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's ``factors_t`` from two products over the bases: the layers' coefficients stacked
        (G x k) times the shared bases, in the eager ``factors_t``'s arithmetic (fp32, the scale applied by
        the product)."""
        first = layers[0]
        (d_in, d_out), r, g = first._shape, first.r, len(layers)
        with torch.autocast(first.bases_a_t.device.type, enabled=False):
            alphas = torch.stack([layer.nola_alpha for layer in layers])
            betas = torch.stack([layer.nola_beta for layer in layers])
            a_t = torch.mm(alphas, first.bases_a_t.T).view(g, r, d_in).unbind(0)
            b_t = torch.addmm(first._zero, betas, first.bases_b_t.T, beta=0, alpha=first.scale)
            b_t = b_t.view(g, d_out, r).unbind(0)
        return list(zip(a_t, b_t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.take_operands()
        a_t, b_t = factors if factors is not None else self.factors_t()  # the scale is in b_t
        return low_rank_linear(x, self.base.weight, self.base.bias, a_t, b_t)

    def delta_weight(self) -> torch.Tensor:
        """Delta W (d_out x d_in) = (1/r) (A B)^T."""
        a_t, b_t = self.factors_t()
        return b_t @ a_t

    def merged_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype), self.base.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, k={self.nola_alpha.numel()}, "
                f"l={self.nola_beta.numel()}, seed={self.seed}")


class NoLA(LinearAdapterMethod):
    name = "nola"
    summary = ("NoLA (Koohpayegani et al. 2024): Delta W = A B with A, B trainable mixtures of k and l fixed "
               "random bases from a seed; k + l parameters per matrix")
    layer_class = NoLALinear
    settings = {
        "r": Setting(1, "rank of A (d_in x r) and B (r x d_out); the update is scaled by 1/r", kind=int, ge=1),
        "k": Setting(1024, "number of random bases (and trainable coefficients) for A", kind=int, ge=1),
        "l": Setting(1024, "number of random bases (and trainable coefficients) for B", kind=int, ge=1),
        "seed": Setting(0, "seed of the random bases (stored with the adapter; the bases are regenerated)",
                        kind=int),
        "shared_bases": Setting(True, "True (the authors' code): every layer uses `seed`, so same-shape layers "
                                      "share bases; False: layer i uses seed + i"),
        "zero_init": Setting(False, "False (the authors' code): alpha = 1/k and beta = 1/l, a small non-zero "
                                    "update at step 0; True: beta starts at 0 (zero update at step 0)"),
    }
    default_lr = 5e-3  # the paper's ViT runs: Adam, lr 5e-3 with a cosine decay

    def layer_factory(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any],
                      ctx: MethodContext) -> LayerBuilder:
        r, k, l, seed = int(settings["r"]), int(settings["k"]), int(settings["l"]), int(settings["seed"])
        shared = bool(settings["shared_bases"])
        cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        index = [0]

        def build(name: str, linear: nn.Linear) -> NoLALinear:
            d_in, d_out = linear.in_features, linear.out_features
            layer_seed = seed if shared else seed + index[0]
            index[0] += 1
            key = (layer_seed, d_in, d_out, linear.weight.dtype, linear.weight.device)
            if key not in cache:
                # The A bases and the B bases come from one generator stream, A first, as in the code.
                gen = torch.Generator(device="cpu").manual_seed(layer_seed)
                bound_a, bound_b = 1.0 / math.sqrt(d_in * r), 1.0 / math.sqrt(r * d_out)
                a = torch.rand(k, d_in, r, generator=gen).mul_(2 * bound_a).sub_(bound_a)
                b = torch.rand(l, r, d_out, generator=gen).mul_(2 * bound_b).sub_(bound_b)
                # stored in the layer's layout (see NoLALinear), shared by every layer of this key
                cache[key] = tuple(t.to(linear.weight.device, linear.weight.dtype).permute(2, 1, 0).contiguous()
                                   .permute(2, 1, 0) for t in (a, b))
            a, b = cache[key]
            return NoLALinear(linear, a, b, r=r, seed=layer_seed, zero_init=bool(settings["zero_init"]))

        return build

    def describe(self, model: nn.Module) -> dict[str, Any]:
        layers = self.layers(model)
        return {"adapted_matrices": len(layers), "seeds": sorted({m.seed for _, m in layers})}

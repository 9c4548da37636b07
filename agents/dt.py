"""The Decision Transformer (EVA appendix E.2; Schmied et al. 2024, L2M).

GPT-2-like, pre-LayerNorm blocks. Four tokens per timestep in the order state, return-to-go, action,
reward; one Linear embedding per modality, a learned per-episode timestep embedding added to all four
tokens of a step, a global token-position embedding (EVA), a LayerNorm on the embedded sequence and
dropout. The action a_t is read from the return-to-go token of step t (it has seen s_t and R_t) through
one Linear and tanh.

Block Linears are named ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``,
``blocks.N.mlp.fc2`` so adapters can target them; the head is ``action_head``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.methods.base import AdapterSite
from agents.tasks import ACT_DIM, EPISODE_LENGTH, OBS_DIM

TOKENS_PER_STEP = 4
ResidualDtype = Literal["float32", "bfloat16"]
RESIDUAL_DTYPES: tuple[str, ...] = get_args(ResidualDtype)
SITE = AdapterSite(targets=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), head=("action_head",),
                   feedforward=("mlp.fc2",))


@dataclass(frozen=True)
class DTConfig:
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 512
    context: int = 50  # timesteps; the sequence has 4x as many tokens
    dropout: float = 0.2
    state_dim: int = OBS_DIM
    act_dim: int = ACT_DIM
    max_ep_len: int = EPISODE_LENGTH
    # The residual stream's dtype under bf16 autocast. "float32" (the default, as autocast leaves it): the
    # blocks' bf16 outputs are added into an fp32 stream, and every norm, residual add and their gradients
    # move fp32 activations. "bfloat16": the stream is cast to bf16 after the embedding, so those move half
    # the bytes (Megatron-LM's default; its --fp32-residual-connection is the float32 choice). The norms
    # still compute in fp32. Without autocast (CPU) the weights are fp32 and the stream stays fp32.
    residual_dtype: ResidualDtype = "float32"

    def __post_init__(self) -> None:
        for k in ("n_layer", "n_head", "n_embd", "context"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"DT {k} must be >= 1, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"DT width n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"DT dropout must be in [0, 1), got {self.dropout}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ConfigError(f"DT residual_dtype must be one of {', '.join(RESIDUAL_DTYPES)}, got "
                              f"{self.residual_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict; the default fp32 residual is left out, so a pretrained base's
        cache key and file metadata from before the setting existed still name the same model."""
        d = asdict(self)
        if d["residual_dtype"] == "float32":
            del d["residual_dtype"]
        return d

    def describe(self) -> str:
        bf16 = ", residual=bfloat16" if self.residual_dtype == "bfloat16" else ""
        return (f"DecisionTransformer(layers={self.n_layer}, heads={self.n_head}, width={self.n_embd}, "
                f"context={self.context}{bf16})")


class Attention(nn.Module):
    def __init__(self, cfg: DTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if mask is None:  # no padding: the causal flag lets SDPA pick the flash kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, C)))


class MLP(nn.Module):
    def __init__(self, cfg: DTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.fc2 = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: DTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class DecisionTransformer(nn.Module):
    """``forward(states, actions, returns_to_go, rewards, timesteps, attention_mask) -> actions`` (B, K, act_dim)."""

    def __init__(self, cfg: DTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.embed_state = nn.Linear(cfg.state_dim, d)
        self.embed_rtg = nn.Linear(1, d)
        self.embed_action = nn.Linear(cfg.act_dim, d)
        self.embed_reward = nn.Linear(1, d)
        self.embed_timestep = nn.Embedding(cfg.max_ep_len, d)
        self.embed_pos = nn.Embedding(TOKENS_PER_STEP * cfg.context, d)
        self.embed_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(d)
        self.action_head = nn.Linear(d, cfg.act_dim)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, states, actions, returns_to_go, rewards, timesteps) -> torch.Tensor:
        B, K, _ = states.shape
        if K > self.cfg.context:
            raise ValueError(f"window of {K} steps is longer than the DT's context {self.cfg.context}")
        t = self.embed_timestep(timesteps.clamp(0, self.cfg.max_ep_len - 1))
        tokens = torch.stack([self.embed_state(states) + t, self.embed_rtg(returns_to_go) + t,
                              self.embed_action(actions) + t, self.embed_reward(rewards) + t], dim=2)
        x = tokens.reshape(B, TOKENS_PER_STEP * K, -1)
        x = x + self.embed_pos(torch.arange(x.shape[1], device=x.device))
        return self.drop(self.embed_norm(x))

    def forward(self, states: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
                rewards: torch.Tensor, timesteps: torch.Tensor,
                attention_mask: torch.Tensor | None = None, **unused: Any) -> torch.Tensor:
        x = self.embed(states, actions, returns_to_go, rewards, timesteps)
        if self.cfg.residual_dtype == "bfloat16" and _bf16_autocast(x.device.type):
            x = x.to(torch.bfloat16)
        shift = None
        if attention_mask is not None:
            # Windows are left-padded (the sampler and the rollouts pad only before the first real step).
            # Rotating each window so that its real tokens come first puts the padding after them, where a
            # causal attention keeps it out of every real token's view: the plain causal flag then gives
            # the real tokens exactly what the padding mask gave them, and SDPA keeps its flash kernel
            # (a boolean mask sends it to a slower one). The position embeddings were added before the
            # rotation, so every token keeps its place in the window.
            shift = TOKENS_PER_STEP * (~attention_mask.bool()).sum(1)
            x = rotate_tokens(x, shift)
        for block in self.blocks:
            x = block(x, None)
        if shift is not None:
            x = rotate_tokens(x, -shift)
        x = self.norm_f(x)
        rtg_hidden = x[:, 1::TOKENS_PER_STEP]  # token order s, R, a, r: R_t has seen s_t and R_t
        return torch.tanh(self.action_head(rtg_hidden))


def _bf16_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def _rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    L = x.shape[1]
    index = (torch.arange(L, device=x.device)[None, :] + shift[:, None]) % L
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


class _Rotate(torch.autograd.Function):
    # A rotation is a permutation: its backward is the opposite rotation, a gather again. Autograd's own
    # backward of gather is a scatter-add (atomics on a GPU, refused under deterministic algorithms).
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(shift)
        return _rotate(x, shift)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (shift,) = ctx.saved_tensors
        return _rotate(grad, -shift), None


def rotate_tokens(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = x[b, (i + shift[b]) mod L]`` for ``x`` (B, L, C) and integer ``shift`` (B,): each
    sequence rotated left by its own number of tokens (``-shift`` undoes it)."""
    return _Rotate.apply(x, shift)


def token_attention_mask(step_mask: torch.Tensor | None, n_tokens: int) -> torch.Tensor | None:
    """(B, 1, L, L) boolean mask: causal, padded keys hidden; None without a step mask.

    The attention the DT's rotation reproduces for real tokens (tests compare the two); the DT itself no
    longer builds it. Every query may see itself, so padded queries never have an all-hidden row.
    """
    if step_mask is None:
        return None
    keys = step_mask.bool().repeat_interleave(TOKENS_PER_STEP, dim=1)  # (B, L)
    causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=keys.device).tril()
    eye = torch.eye(n_tokens, dtype=torch.bool, device=keys.device)
    return ((causal & keys[:, None, :]) | eye)[:, None]


def dt_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the action dimensions at non-padded steps only."""
    m = mask.to(pred.dtype).unsqueeze(-1)
    return ((pred.float() - target.float()) ** 2 * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1.0)


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy or torch batch -> tensors on ``device`` (non-blocking from pinned memory on CUDA)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v
        if t.device == device:
            pass
        elif device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
        out[k] = t
    return out


def forward_batch(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's action predictions for a sampled batch (keyword call: works through PEFT's wrappers)."""
    return model(states=batch["states"], actions=batch["actions"], returns_to_go=batch["returns_to_go"],
                 rewards=batch["rewards"], timesteps=batch["timesteps"], attention_mask=batch["attention_mask"])


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return dt_loss(forward_batch(model, batch), batch["actions"], batch["attention_mask"])


def layer_tokens(layer_input: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A block Linear's input (B, L, C) as (tokens, C) with the padded steps' four tokens dropped (EVA).

    Inside the blocks each window is rotated so that its real tokens come first (``forward``): the kept
    rows are the first ``4 x real steps`` of each window, which for a left-padded mask is the mask reversed.
    """
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    keep = batch["attention_mask"].bool().flip(1).repeat_interleave(TOKENS_PER_STEP, dim=1)
    if x.shape[:2] != keep.shape:
        return x.reshape(-1, x.shape[-1])
    return x[keep]


def flops_per_step(cfg: DTConfig, batch_size: int) -> float:
    """Training FLOPs of one update: 6 x matmul params x tokens plus attention (PaLM appendix B's count)."""
    d, L = cfg.n_embd, TOKENS_PER_STEP * cfg.context
    block_params = cfg.n_layer * 12 * d * d
    embed_params = (cfg.state_dim + cfg.act_dim + 2) * d + d * cfg.act_dim
    attn = cfg.n_layer * 12 * L * d  # QK^T and AV, forward+backward, per token
    return float(batch_size * L * (6 * (block_params + embed_params) + attn))

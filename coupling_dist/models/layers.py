"""Plain transformer building blocks shared by Stage A (flow conditioners, decoder) and Stage B.

Model code knows nothing about parallelism: projections are ``nn.Linear`` with TP-friendly
names (q/k/v/gate/up/fc_in are column-splittable, o/down/fc_out are row-splittable), and the
number of heads is derived from the projection's *current* output width, so
``coupling_dist.distributed.tensor_parallel`` can swap the linears for sharded ones and the same
forward runs on the local heads.

Attention backend: flash-attn when CUDA and the package are present, PyTorch SDPA otherwise;
chosen once by capability (``attention_backend``), never by try/except in the hot path.
flash-attn only runs fp16/bf16 on CUDA, so fp32 tensors use SDPA even when flash was chosen.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("coupling_dist.models.layers")
_BACKEND: dict[str, str] = {}


def attention_backend(requested: str = "auto") -> str:
    """'flash' or 'sdpa', decided once per requested value and logged."""
    if requested not in _BACKEND:
        has_flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
        if requested == "flash" and not has_flash:
            raise RuntimeError("attention 'flash' requested but flash-attn/CUDA is not available "
                               "(install the 'gpu' extra on a CUDA machine, or use attention: auto)")
        choice = "flash" if (requested in ("auto", "flash") and has_flash) else "sdpa"
        _BACKEND[requested] = choice
        log.info("attention backend: %s (requested %s, CUDA %s)", choice, requested, torch.cuda.is_available())
    return _BACKEND[requested]


def _flash(q, k, v, causal: bool, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """q,k,v [B, T, H, D] (flash layout). key_mask [B, T] bool (True = real) unpads via varlen."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if key_mask is None:
        return flash_attn_func(q, k, v, causal=causal)
    B, T, H, D = q.shape
    flat = key_mask.reshape(-1)
    idx = flat.nonzero(as_tuple=False).squeeze(1)
    lens = key_mask.sum(1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(q.reshape(B * T, H, D)[idx], k.reshape(B * T, H, D)[idx],
                                 v.reshape(B * T, H, D)[idx], cu, cu, int(lens.max()), int(lens.max()), causal=causal)
    full = q.new_zeros(B * T, H, D)
    full[idx] = out
    return full.view(B, T, H, D)


def attend(q, k, v, *, causal: bool = False, key_mask: Optional[torch.Tensor] = None,
           backend: str = "sdpa") -> torch.Tensor:
    """q,k,v [B, T, H, D] -> [B, T, H, D]. key_mask [B, T] bool, True = may be attended to."""
    if backend == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(q, k, v, causal, key_mask)
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # [B, 1, 1, T] broadcast over heads and queries
        if causal:
            T = q.shape[1]
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            causal = False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown norm '{kind}' (rmsnorm|layernorm)")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, bias: bool = False, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by heads {heads}")
        self.head_dim = dim // heads
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        heads = q.shape[-1] // self.head_dim  # local heads (fewer under tensor parallelism)
        shape = (B, T, heads, self.head_dim)
        out = attend(q.view(shape), k.view(shape), v.view(shape), causal=causal, key_mask=key_mask,
                     backend=attention_backend(self.backend))
        return self.o(out.reshape(B, T, heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, ffn: int, act: str = "swiglu", bias: bool = False):
        super().__init__()
        self.act = act
        if act == "swiglu":
            self.gate = nn.Linear(dim, ffn, bias=bias)
            self.up = nn.Linear(dim, ffn, bias=bias)
            self.down = nn.Linear(ffn, dim, bias=bias)
        elif act == "gelu":
            self.fc_in = nn.Linear(dim, ffn, bias=bias)
            self.fc_out = nn.Linear(ffn, dim, bias=bias)
        else:
            raise ValueError(f"unknown activation '{act}' (swiglu|gelu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-norm transformer block (bidirectional unless ``causal`` is passed)."""

    def __init__(self, dim: int, heads: int, ffn: int, *, norm: str = "rmsnorm", act: str = "swiglu",
                 backend: str = "auto"):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, backend=backend)
        self.norm2 = make_norm(norm, dim)
        self.mlp = MLP(dim, ffn, act)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask, causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks plus a final norm; input/output [B, T, dim].

    ``checkpoint_blocks`` (set by ``distributed.parallelize.apply_activation_checkpointing``): in
    training with autograd on, each block's activations are recomputed in backward instead of kept
    (non-reentrant ``torch.utils.checkpoint``: works under DeepSpeed ZeRO and megatron TP layers)."""

    def __init__(self, dim: int, depth: int, heads: int, ffn: int, *, norm: str = "rmsnorm", act: str = "swiglu",
                 backend: str = "auto"):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, ffn, norm=norm, act=act, backend=backend) for _ in range(depth))
        self.norm = make_norm(norm, dim)
        self.checkpoint_blocks = False

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, key_mask, causal, use_reentrant=False)
            else:
                x = block(x, key_mask, causal)
        return self.norm(x)


def transformer_flops_per_token(dim: int, depth: int, ffn: int, seq_len: int, act: str = "swiglu") -> float:
    """Forward FLOPs per token of ``Transformer`` (matmuls only; x3 for forward+backward)."""
    mlp = (3 if act == "swiglu" else 2) * 2 * dim * ffn
    attn_proj = 4 * 2 * dim * dim
    attn_scores = 2 * 2 * seq_len * dim  # QK^T and AV
    return depth * (mlp + attn_proj + attn_scores)


def unpatch_states(unpatch: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """[B, T/k, width] -> [B, T, width] through ``unpatch`` (width -> k * width): latent position
    p's state becomes the states of its k tokens p*k .. p*k + k - 1 (``stage_a.patch``)."""
    B, P, W = h.shape
    return unpatch(h).reshape(B, P * (unpatch.out_features // W), W)

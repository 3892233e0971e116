"""TarFlow-style flow: affine autoregressive over positions, for comparison with RealNVP.

Each block transforms every position t with a shift/log-scale predicted by a *causal* transformer
from the positions before it (z_t = (u_t - mu(u_<t)) * exp(-alpha(u_<t))), so the Jacobian is
block-triangular and log|det| = -sum alpha. Blocks alternate the position order (forward,
reversed), so every position eventually conditions on every other one. The first position of an
order gets mu = alpha = 0 (it has no context).

Pads: the order is computed per sample over the *real* positions only (pads are moved behind
them, whatever the mask layout), so in both orders the real positions form a causal prefix that
never sees a pad, and pads pass through with zero log-det. The inverse is sequential over
positions (T conditioner passes per block): exact, and only needed for round-trip checks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import transformer_flops_per_token
from .realnvp import Conditioner, FlowStack


def _order(mask: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Per-sample permutation [B, T]: real positions first (ascending or descending), then pads."""
    B, T = mask.shape
    t = torch.arange(T, device=mask.device)
    key = (~mask).long() * (2 * T) + ((T - 1 - t) if reverse else t)[None]
    return torch.argsort(key, dim=1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _scatter(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x).scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)


class TarFlowBlock(nn.Module):
    def __init__(self, dim: int, reverse: bool, hidden: int, depth: int, heads: int, ffn: int, bound: float):
        super().__init__()
        self.dim, self.reverse, self.bound = dim, reverse, bound
        self.cond = Conditioner(dim, 2 * dim, hidden, depth, heads, ffn)

    def _params(self, xp: torch.Tensor, mp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros((), dtype=xp.dtype, device=xp.device)
        out = self.cond(torch.where(mp[..., None], xp, zero), mp, causal=True)
        # Output at t-1 parameterises position t: shift right by one, first position gets zeros.
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        mu, alpha = out[..., :self.dim], out[..., self.dim:]
        alpha = self.bound * torch.tanh(alpha / self.bound)
        return torch.where(mp[..., None], mu, zero), torch.where(mp[..., None], alpha, zero)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _order(m, self.reverse)
        xp, mp = _gather(x, idx), torch.gather(m, 1, idx)
        mu, alpha = self._params(xp, mp)
        zp = (xp - mu) * torch.exp(-alpha)
        return _scatter(zp, idx), -alpha.sum(dim=(1, 2))

    def inverse(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        idx = _order(m, self.reverse)
        zp, mp = _gather(z, idx), torch.gather(m, 1, idx)
        T = z.shape[1]
        cols: list[torch.Tensor] = []
        for t in range(T):
            # Positions >= t are still unknown; zeros there cannot affect position t (causal).
            known = torch.cat(cols + [torch.zeros_like(zp[:, t:])], dim=1)
            mu, alpha = self._params(known, mp)
            cols.append(zp[:, t:t + 1] * torch.exp(alpha[:, t:t + 1]) + mu[:, t:t + 1])
        return _scatter(torch.cat(cols, dim=1), idx)


class TarFlow(FlowStack):
    """``forward(u, mask) -> (z, logdet[B])``, ``inverse(z, mask) -> u`` (same API as RealNVP)."""

    def __init__(self, dim: int, layers: int = 4, hidden: int = 64, depth: int = 1, heads: int = 4,
                 ffn: Optional[int] = None, scale_bound: float = 2.0):
        super().__init__()
        self.dim, self.hidden, self.depth = dim, hidden, depth
        self.ffn = ffn or 2 * hidden
        self.layers = nn.ModuleList(TarFlowBlock(dim, bool(i % 2), hidden, depth, heads, self.ffn, scale_bound)
                                    for i in range(layers))

    def flops_per_token(self, seq_len: int) -> float:
        per_block = 2 * self.dim * self.hidden + 2 * self.hidden * 2 * self.dim
        per_block += transformer_flops_per_token(self.hidden, self.depth, self.ffn, seq_len)
        return len(self.layers) * per_block

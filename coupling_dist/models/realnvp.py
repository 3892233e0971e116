"""RealNVP over a whole latent sequence u [B, T, d] (Stage A's flow).

Each coupling layer splits the *channels* into two halves (which half is kept alternates between
layers) and transforms the other half with an affine map whose shift and log-scale come from a
small **bidirectional transformer over positions** fed the kept half. Because the conditioner sees
every position, the flow models the joint latent across positions: an i.i.d. per-token flow would
leave positions correlated while sampling assumes N(0, I) on the whole [T, d] block.

Pads (mask == 0) pass through unchanged with zero log-det contribution: their conditioner input is
zeroed, they are excluded as attention keys, and their shift/log-scale are forced to 0 with
``torch.where`` (not a multiply, so a non-finite value at a pad can never leak into a real entry).
Hence non-pad outputs do not depend on pad values and ``forward``/``inverse`` are exact inverses
for any mask.

Log-scales are bounded by ``bound * tanh(raw / bound)`` so a single layer can never blow up; the
last linear layer of every conditioner is zero-initialised so the flow starts as the identity.
Class conditioning (``num_classes`` > 0, ``data.num_classes``): every coupling's conditioner adds
its own class embedding (``models/conditioning.py``: num_classes + 1 rows, the last the null class)
to its hidden input at every position, so the flow is NF(u; y); the null class gives an
unconditional flow trained by conditioning dropout (``stage_a.cond_dropout``). The conditioners'
zero-initialised outputs keep the flow the identity at init for every class. TarFlow stays
unconditional (``config.py`` refuses ``stage_a.flow.kind: tarflow`` with classes).

``conditioner: mlp`` (``MLPCoupling``) replaces the channel split and the transformer with
couplings over the whole flattened [P, d] latent and an MLP conditioner: for short fixed lengths
it fits the joint far better per second of CPU (docs/QUALITY_RESEARCH.md, finding 12).

Conditioners use LayerNorm (not the shared RMSNorm, which computes in float32 whatever the input
dtype): in float64 the whole flow is then float64 end to end, which the exact log-det and
inverse checks need.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .conditioning import ClassEmbedding, class_rows
from .layers import Transformer, transformer_flops_per_token


def sinusoidal_positions(T: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed [T, dim] position code: no max length to store, so one model serves any seq_len."""
    pos = torch.arange(T, device=device, dtype=torch.float64)[:, None]
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float64) / max(half, 1))
    ang = pos * freq[None]
    out = torch.zeros(T, dim, device=device, dtype=torch.float64)
    out[:, 0:2 * half:2] = torch.sin(ang)
    out[:, 1:2 * half:2] = torch.cos(ang)
    return out.to(dtype or torch.get_default_dtype())


def safe_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """Attention key mask with at least one key per row: a fully padded row would otherwise give
    NaN attention (its outputs are discarded anyway)."""
    km = mask.bool().clone()
    km[:, 0] |= ~km.any(1)
    return km


class Conditioner(nn.Module):
    """[B, T, n_in] -> [B, T, n_out] through in-proj + positions + transformer + zero-init out-proj."""

    def __init__(self, n_in: int, n_out: int, hidden: int, depth: int, heads: int, ffn: int,
                 norm: str = "layernorm", act: str = "swiglu", num_classes: int = 0):
        super().__init__()
        self.inp = nn.Linear(n_in, hidden)
        self.body = Transformer(hidden, depth, heads, ffn, norm=norm, act=act)
        self.out = nn.Linear(hidden, n_out)
        nn.init.zeros_(self.out.weight)  # identity flow at init
        nn.init.zeros_(self.out.bias)
        # created last: an unconditional conditioner draws exactly the initial weights it always did;
        # unit scale like the sinusoidal positions it is added to
        self.cls = ClassEmbedding(num_classes, hidden, std=1.0) if num_classes else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, causal: bool = False,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``rows``: class-embedding rows [B] (``conditioning.class_rows``), conditional flows only."""
        h = self.inp(x) + sinusoidal_positions(x.shape[1], self.inp.out_features, x.device, x.dtype)
        if self.cls is not None:
            h = h + self.cls.table(rows)[:, None].to(h.dtype)
        return self.out(self.body(h, safe_key_mask(mask), causal))


class AffineCoupling(nn.Module):
    """One channel-split affine coupling; ``parity`` picks which half is kept."""

    def __init__(self, dim: int, parity: int, hidden: int, depth: int, heads: int, ffn: int, bound: float,
                 num_classes: int = 0):
        super().__init__()
        self.dim, self.parity, self.bound = dim, parity, bound
        self.split = dim // 2
        n_keep = self.split if parity == 0 else dim - self.split
        self.n_change = dim - n_keep
        self.cond = Conditioner(n_keep, 2 * self.n_change, hidden, depth, heads, ffn, num_classes=num_classes)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = x[..., :self.split], x[..., self.split:]
        return (lo, hi) if self.parity == 0 else (hi, lo)

    def _join(self, keep: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        return torch.cat([keep, change] if self.parity == 0 else [change, keep], dim=-1)

    def _params(self, keep: torch.Tensor, m: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.where(m[..., None], keep, torch.zeros((), dtype=keep.dtype, device=keep.device))
        raw = self.cond(keep, m, rows=rows)
        shift, logs = raw[..., :self.n_change], raw[..., self.n_change:]
        logs = self.bound * torch.tanh(logs / self.bound)
        zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
        return torch.where(m[..., None], shift, zero), torch.where(m[..., None], logs, zero)

    def forward(self, x: torch.Tensor, m: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        keep, change = self._halves(x)
        shift, logs = self._params(keep, m, rows)
        return self._join(keep, change * torch.exp(logs) + shift), logs.sum(dim=(1, 2))

    def inverse(self, y: torch.Tensor, m: torch.Tensor, rows=None) -> torch.Tensor:
        keep, change = self._halves(y)
        shift, logs = self._params(keep, m, rows)
        return self._join(keep, (change - shift) * torch.exp(-logs))


class FlowStack(nn.Module):
    """A stack of invertible layers ``layer(u, m) -> (u', logdet)`` / ``layer.inverse(z, m)``:
    ``forward(u, mask) -> (z, logdet[B])`` with logdet = log|det dz/du|; ``inverse(z, mask) -> u``.
    Shared by RealNVP and TarFlow, which differ only in their layers."""

    layers: nn.ModuleList
    num_classes = 0  # > 0: a class-conditional flow (RealNVP only); its layers take embedding rows

    @staticmethod
    def _mask(u: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if mask is None:
            return torch.ones(u.shape[:2], dtype=torch.bool, device=u.device)
        return mask.bool()

    def _rows(self, labels: Optional[torch.Tensor], x: torch.Tensor) -> dict:
        """The layers' extra arguments: {} for an unconditional flow (which refuses labels), else the
        class-embedding rows of ``labels`` (None / -1: the null class)."""
        if not self.num_classes:
            if labels is not None:
                class_rows(labels, 0, x.shape[0], x.device)  # raises, naming data.num_classes
            return {}
        return {"rows": class_rows(labels, self.num_classes, x.shape[0], x.device)}

    def forward(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._mask(u, mask)
        kw = self._rows(labels, u)
        logdet = u.new_zeros(u.shape[0])
        for layer in self.layers:
            u, ld = layer(u, m, **kw)
            logdet = logdet + ld
        return u, logdet

    def inverse(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self._mask(z, mask)
        kw = self._rows(labels, z)
        for layer in reversed(self.layers):
            z = layer.inverse(z, m, **kw)
        return z


class MLPCoupling(nn.Module):
    """One affine coupling over the whole flattened latent [B, P * d] (``conditioner: mlp``): a fixed
    half of the P * d elements is kept and fed to an MLP (``depth`` hidden layers of ``hidden``,
    GELU, zero-initialised output) that gives the shift and log-scale of the other half.

    Why (docs/QUALITY_RESEARCH.md, finding 12): at a short fixed length the joint over positions is
    what the flow must fit, and an MLP over all P * d elements fits it with ~8x the parameters of
    the transformer conditioner at a fraction of its step cost on CPU (one GEMM chain per sample
    instead of attention and an FFN at every position). Needs a fixed number of latent positions P.

    Pads (mask == 0; ``pad_positions: passthrough`` only) are handled as in ``AffineCoupling``:
    their inputs are zeroed and their shift/log-scale forced to 0, so they pass through unchanged
    and no real output depends on them."""

    def __init__(self, dim: int, positions: int, keep: torch.Tensor, change: torch.Tensor, hidden: int, depth: int,
                 bound: float, num_classes: int = 0):
        super().__init__()
        self.dim, self.positions, self.bound = dim, positions, bound
        self.register_buffer("keep_idx", keep, persistent=False)  # rebuilt from the config, never stored
        self.register_buffer("change_idx", change, persistent=False)
        self.n_change = int(change.numel())
        layers: list[nn.Module] = []
        width = int(keep.numel())
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, 2 * self.n_change)
        nn.init.zeros_(self.out.weight)  # identity flow at init
        nn.init.zeros_(self.out.bias)
        # class conditioning: an embedding added to the last hidden layer, before the out-proj
        self.cls = ClassEmbedding(num_classes, width, std=1.0) if num_classes else None

    def _params(self, keep: torch.Tensor, m: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros((), dtype=keep.dtype, device=keep.device)
        keep = torch.where(m[:, self.keep_idx], keep, zero)
        h = self.body(keep)
        if self.cls is not None:
            h = h + self.cls.table(rows).to(h.dtype)
        raw = self.out(h)
        shift, logs = raw[:, :self.n_change], raw[:, self.n_change:]
        logs = self.bound * torch.tanh(logs / self.bound)
        mc = m[:, self.change_idx]
        return torch.where(mc, shift, zero), torch.where(mc, logs, zero)

    def _flat(self, x: torch.Tensor, m: torch.Tensor):
        if x.shape[1] != self.positions:
            raise ValueError(f"this flow was built for {self.positions} latent positions (stage_a.flow.conditioner: "
                             f"mlp needs a fixed length: data.seq_len / stage_a.patch) but got {x.shape[1]}")
        B = x.shape[0]
        return x.reshape(B, -1), m[..., None].expand(-1, -1, self.dim).reshape(B, -1)

    def forward(self, x: torch.Tensor, m: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        f, mf = self._flat(x, m)
        keep = f[:, self.keep_idx]
        shift, logs = self._params(keep, mf, rows)
        out = f.index_copy(1, self.change_idx, f[:, self.change_idx] * torch.exp(logs) + shift)
        return out.reshape(x.shape), logs.sum(dim=1)

    def inverse(self, y: torch.Tensor, m: torch.Tensor, rows=None) -> torch.Tensor:
        f, mf = self._flat(y, m)
        shift, logs = self._params(f[:, self.keep_idx], mf, rows)
        out = f.index_copy(1, self.change_idx, (f[:, self.change_idx] - shift) * torch.exp(-logs))
        return out.reshape(y.shape)


def mlp_coupling_halves(n: int, layers: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(kept, changed) element indices of each MLP coupling: a random half is kept (fixed seed, so
    every rank and every rebuild from an export agree), and the next coupling swaps the two, so each
    pair of couplings transforms every element once. Made on the CPU explicitly: the planner builds
    models under a meta-device context, where a random permutation has no data."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        if i % 2 == 0:
            perm = torch.randperm(n, generator=g, device="cpu")
            out.append((perm[: n // 2].sort().values, perm[n // 2:].sort().values))
        else:
            out.append(out[-1][::-1])
    return out


class RealNVP(FlowStack):
    """Stack of ``layers`` affine couplings.

    ``conditioner: transformer`` (default): channel-split couplings (alternating halves) whose
    conditioner is a transformer over positions (any length). ``conditioner: mlp``: couplings over
    the flattened [positions * dim] block with an MLP conditioner (``MLPCoupling``; fixed length).

    ``forward(u, mask) -> (z, logdet[B])`` with logdet = log|det dz/du|; ``inverse(z, mask) -> u``.
    """

    def __init__(self, dim: int, layers: int = 4, hidden: int = 64, depth: int = 1, heads: int = 4,
                 ffn: Optional[int] = None, scale_bound: float = 2.0, num_classes: int = 0,
                 conditioner: str = "transformer", positions: Optional[int] = None):
        super().__init__()
        if dim < 2:
            raise ValueError(f"RealNVP needs latent dim >= 2 for channel-split couplings (got {dim})")
        self.dim, self.hidden, self.depth = dim, hidden, depth
        self.ffn = ffn or 2 * hidden
        self.num_classes = int(num_classes)
        self.conditioner = conditioner
        if conditioner == "mlp":
            if not positions:
                raise ValueError("stage_a.flow.conditioner: mlp needs the number of latent positions "
                                 "(stage_a.flow.positions = data.seq_len / stage_a.patch)")
            self.positions = int(positions)
            halves = mlp_coupling_halves(self.positions * dim, layers)
            self.layers = nn.ModuleList(MLPCoupling(dim, self.positions, keep, change, hidden, depth, scale_bound,
                                                    self.num_classes) for keep, change in halves)
        elif conditioner == "transformer":
            self.layers = nn.ModuleList(AffineCoupling(dim, i % 2, hidden, depth, heads, self.ffn, scale_bound,
                                                       self.num_classes) for i in range(layers))
        else:
            raise ValueError(f"stage_a.flow.conditioner {conditioner!r} is not one of transformer|mlp")

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per position (an MLP coupling's per-sample cost spread over its positions)."""
        mlp = self.conditioner == "mlp"
        per = 0.0
        for layer in self.layers:
            n_keep = (self.positions * self.dim if mlp else self.dim) - layer.n_change
            per += 2 * n_keep * self.hidden + 2 * self.hidden * 2 * layer.n_change
            per += (2 * self.hidden * self.hidden * (self.depth - 1) if mlp
                    else transformer_flops_per_token(self.hidden, self.depth, self.ffn, seq_len))
        return per / self.positions if mlp else per

"""Tiny stand-ins with the exported generator's call signatures (tests and benchmarks only):
``OneStepToy(z) -> logits [B, T, V]`` and ``MaskedToy(z, x_t) -> logits [B, T, V]``."""
from __future__ import annotations

import torch
from torch import nn


class OneStepToy(nn.Module):
    def __init__(self, vocab: int, seq_len: int, latent_dim: int, eos_id: int | None = None, seed: int = 0,
                 sharpness: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(latent_dim, vocab, generator=g) * sharpness / latent_dim ** 0.5)
        self.pos = nn.Parameter(torch.randn(seq_len, vocab, generator=g))
        if eos_id is not None:  # EOS grows likelier along the sequence, so texts end at varied lengths
            with torch.no_grad():
                self.pos[:, eos_id] = torch.linspace(-4.0, 6.0, seq_len) * sharpness

    def forward(self, z):
        return z @ self.proj + self.pos


class MaskedToy(nn.Module):
    """Logits depend on z and on the tokens currently revealed at the neighbouring positions, so
    revealed tokens can lose confidence later (P2-self then remasks them)."""

    def __init__(self, vocab: int, seq_len: int, latent_dim: int, mask_id: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mask_id = mask_id
        self.proj = nn.Parameter(torch.randn(latent_dim, vocab, generator=g) * 2.0 / latent_dim ** 0.5)
        self.pos = nn.Parameter(torch.randn(seq_len, vocab, generator=g))
        self.emb = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2.5)

    def forward(self, z, x_t):
        e = self.emb[x_t]  # [B, T, V]; the mask token has its own row
        ctx = torch.roll(e, 1, dims=1) + torch.roll(e, -1, dims=1)
        return z @ self.proj + self.pos + ctx


def onestep_meta(vocab, seq_len, latent_dim, eos_id, tokenizer=None):
    return {"kind": "onestep", "vocab_size": vocab, "seq_len": seq_len, "latent_dim": latent_dim, "eos_id": eos_id,
            "pad_id": eos_id, "tokenizer": tokenizer}


def masked_meta(vocab, seq_len, latent_dim, eos_id, mask_id, tokenizer=None):
    m = onestep_meta(vocab, seq_len, latent_dim, eos_id, tokenizer)
    m.update(kind="masked", mask_token_id=mask_id)
    return m

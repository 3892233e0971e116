"""One-step sampling from a latent-to-sequence generator G(z) -> logits [B, T, V].

z ~ N(0, s^2 I) of shape [T, d] per sample, one forward pass, temperature and top-p at every
position, all positions sampled in parallel.

Reproducibility: every sample owns a CPU ``torch.Generator`` seeded from (seed, sample index) by
``numpy.random.SeedSequence``; it draws the sample's latent and then one uniform per position
per step. A sample's output is therefore a function of (seed, index, settings, weights) only:
independent of the batch size, of how many ranks share the work, and of which rank draws it.
(The forward pass itself is deterministic up to the floating-point behaviour of the backend for
a given batch shape; on CPU and in the tests the ids are identical across batch sizes.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .top_p import DEFAULT_K, apply_temperature, sample_top_p


@dataclass
class SampleSettings:
    temperature: Union[float, list] = 0.6  # a float, or per-position [T] for one step / per-step [K] for P2
    top_p: float = 0.95
    latent_scale: float = 0.85
    steps: int = 1  # few-step K (masked denoisers only)
    eta: float = 1.0
    kappa: str = "linear"  # P2-self unmasking schedule (Algorithm 3: any monotone kappa; linear default)
    proposal_top_p: float = 1.0  # P2-self proposals: no nucleus unless asked (Algorithm 3)
    seed: int = 0
    top_k_prefilter: int = DEFAULT_K
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d.pop("top_k_prefilter")
        return d


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` (a pure function of (seed, index))."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state[0]) | (int(state[1]) << 32))
    return g


def draw_latents(gens: Sequence[torch.Generator], seq_len: int, latent_dim: int, scale: float) -> torch.Tensor:
    """z [B, T, d] ~ N(0, scale^2 I), one row per generator (drawn first from each generator)."""
    return torch.stack([torch.randn(seq_len, latent_dim, generator=g) for g in gens]) * float(scale)


def draw_uniforms(gens: Sequence[torch.Generator], seq_len: int) -> torch.Tensor:
    """u [B, T] in [0, 1): the next draw of each generator (one per position)."""
    return torch.stack([torch.rand(seq_len, generator=g, dtype=torch.float64) for g in gens])


def banned_ids(meta: dict, vocab_limit: Optional[int] = None, device="cpu") -> torch.Tensor:
    """Token ids a sampler must never emit: the mask token of a masked denoiser, and model-vocab
    ids beyond the tokenizer's vocabulary (Qwen pads its 151,669 tokens to 151,936 rows)."""
    V = int(meta["vocab_size"])
    ids = []
    if vocab_limit is not None and vocab_limit < V:
        ids.extend(range(int(vocab_limit), V))
    if meta.get("kind") == "masked" and meta.get("mask_token_id") is not None:
        ids.append(int(meta["mask_token_id"]))
    return torch.tensor(sorted(set(i for i in ids if 0 <= i < V)), dtype=torch.long, device=device)


def model_dtype(model) -> torch.dtype:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _position_temperature(temperature, seq_len: int):
    if isinstance(temperature, (list, tuple)):
        if len(temperature) != seq_len:
            raise ValueError(f"per-position temperature has {len(temperature)} entries, expected seq_len {seq_len}")
        return torch.tensor(temperature, dtype=torch.float32)
    return float(temperature)


def decode_step(logits: torch.Tensor, u: torch.Tensor, temperature, top_p: float,
                banned: Optional[torch.Tensor] = None, k: int = DEFAULT_K) -> torch.Tensor:
    """Sample every position of logits [B, T, V] in parallel; u [B, T] uniforms -> ids [B, T]."""
    B, T, V = logits.shape
    lg = apply_temperature(logits, temperature, banned)
    return sample_top_p(lg.reshape(B * T, V), u.reshape(-1), top_p, k=k).reshape(B, T)


@torch.no_grad()
def sample_onestep(model, meta: dict, indices: Sequence[int], settings: SampleSettings, *,
                   batch_size: int = 32, device="cpu", vocab_limit: Optional[int] = None,
                   progress=None) -> torch.Tensor:
    """Draw samples ``indices`` from a one-step generator ``model(z) -> logits``; returns ids [N, T]
    (on CPU). ``meta`` needs seq_len, latent_dim, vocab_size."""
    temp = _position_temperature(settings.temperature, int(meta["seq_len"]))
    banned = banned_ids(meta, vocab_limit, device)

    def batch(z, gens):
        logits = model(z)  # [B, T, V]: T = z's positions x stage_a.patch
        u = draw_uniforms(gens, logits.shape[1])
        return decode_step(logits, u, temp, settings.top_p, banned, settings.top_k_prefilter)

    return sample_batches(batch, model, meta, indices, settings, batch_size, device, progress)


def sample_batches(sample_batch, model, meta: dict, indices: Sequence[int], settings: SampleSettings,
                   batch_size: int, device, progress=None) -> torch.Tensor:
    """The batching every sampler shares: per batch of ``indices``, each sample's generator draws
    its latent z [B, T / patch, d] first (``meta["patch"]``: tokens per latent position, default 1),
    then ``sample_batch(z, generators) -> ids [B, T]``; ids [N, T] on CPU."""
    T, d = int(meta["seq_len"]), int(meta["latent_dim"])
    P = T // int(meta.get("patch") or 1)
    out = []
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        gens = [sample_generator(settings.seed, i) for i in idx]
        z = draw_latents(gens, P, d, settings.latent_scale).to(device, model_dtype(model))
        out.append(sample_batch(z, gens).cpu())
        if progress is not None:
            progress(len(idx))
    if not out:
        return torch.empty((0, T), dtype=torch.long)
    return torch.cat(out)

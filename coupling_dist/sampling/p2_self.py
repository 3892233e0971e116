"""Few-step sampling from a latent-conditioned masked denoiser H(z, x_t) -> logits [B, T, V]:
the P2-self sampler, exactly as the paper's Algorithm 3 (Appendix E.2).

Per sample, z ~ N(0, s^2 I) is drawn once and kept fixed for all K steps. Start fully masked
(fixed positions, e.g. prompts, keep their tokens and are never masked). For step i = 1..K
(t_i = i / K):
1. logits = H(z, x^(i-1)); banned ids (the mask token, ids beyond the tokenizer) get -inf;
2. for every non-fixed position j (masked *and* previously revealed), Gumbel-perturbed logits
   l~_j = l_j / tau_i + g_j (g ~ Gumbel(0, 1), one per token), proposal x^_j = argmax l~_j,
   score s_j = log softmax(l~_j)[x^_j] (the perturbed distribution, as in Alg. 3 line 12);
3. fixed positions score +inf; previously revealed positions score eta * s_j (s_j <= 0, so
   eta > 1 makes them easier to remask, eta = 0 never remasks them before masked ones);
4. R = the m_i = floor(L * (1 - kappa(t_i))) lowest-scored non-fixed positions (L = number of
   non-fixed positions; ties broken by position) are set to the mask token; positions that were
   masked and are not in R are revealed with their proposal x^_j; previously revealed positions
   outside R keep their current token (line 22 writes only the newly revealed set);
5. after step K, any position still masked takes the last proposal (line 24).
kappa is linear by default (``sample.kappa``; cosine by config). With K = 1 the single step
reveals every proposal of H(z, all-mask): a Gumbel-max draw per position from softmax(l / tau),
i.e. one-step decoding of that model in distribution.

Proposals use no top-p unless asked (``proposal_top_p`` < 1 restricts the argmax to the nucleus
of softmax(l / tau); Algorithm 3 has none). Randomness: each sample's generator draws z, then one
[T, V] block of uniforms per step (Gumbel noise -log(-log u)), so a sample is a function of
(seed, index, settings, weights), whatever the batch size or rank count.

Class-conditional denoisers: ``labels`` [B] condition every step's H(z, x, y), with the same
guidance as the one-step path (``onestep.guided_logits``: cfg = Algorithm 4 at every step).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .onestep import SampleSettings, banned_ids, guided_logits, sample_batches
from .top_p import apply_temperature, top_p_mask


def kappa(name: str, t: float) -> float:
    """Fraction of non-fixed positions revealed after time t in [0, 1]."""
    if name == "linear":
        return float(t)
    if name == "cosine":
        return 1.0 - math.cos(math.pi * t / 2.0) if t < 1.0 else 1.0
    raise ValueError(f"unknown kappa schedule '{name}' (linear, cosine)")


def step_temperatures(temperature, steps: int) -> list[float]:
    if isinstance(temperature, (list, tuple)):
        if len(temperature) != steps:
            raise ValueError(f"per-step temperatures: {len(temperature)} given for {steps} steps")
        return [float(t) for t in temperature]
    return [float(temperature)] * steps


def draw_gumbel(gens: Sequence[torch.Generator], seq_len: int, vocab: int) -> torch.Tensor:
    """g [B, T, V] ~ Gumbel(0, 1): the next [T, V] uniforms of each sample's generator, -log(-log u).
    u is drawn in float64 and kept inside (0, 1) so that g is finite."""
    tiny = torch.finfo(torch.float64).tiny
    u = torch.stack([torch.rand(seq_len, vocab, generator=g, dtype=torch.float64) for g in gens])
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 2 ** -53)))


@torch.no_grad()
def p2_self_batch(model, z: torch.Tensor, gens: Sequence[torch.Generator], mask_id: int, settings: SampleSettings,
                  banned: Optional[torch.Tensor] = None, fixed: Optional[torch.Tensor] = None,
                  x_init: Optional[torch.Tensor] = None, trace: Optional[list] = None,
                  labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run P2-self (Algorithm 3) for one batch. z [B, T, d] on the model's device; ``gens`` are the
    samples' generators positioned after the latent draw. ``fixed`` [B, T] bool marks given
    positions whose tokens come from ``x_init``. If ``trace`` is a list, one dict per step is appended.
    ``labels`` [B]: classes of a class-conditional denoiser (guided as ``settings.guidance`` says)."""
    B, T = z.shape[0], z.shape[1]
    dev = z.device
    K = int(settings.steps)
    taus = step_temperatures(settings.temperature, K)
    top_p = float(getattr(settings, "proposal_top_p", 1.0))
    fixed = torch.zeros(B, T, dtype=torch.bool, device=dev) if fixed is None else fixed.to(dev)
    x = torch.full((B, T), int(mask_id), dtype=torch.long, device=dev)
    if x_init is not None:
        x = torch.where(fixed, x_init.to(dev), x)
    free = (~fixed).sum(1).double()
    pos = torch.arange(T, device=dev).expand(B, T)
    prop = x
    for i in range(1, K + 1):
        lg = apply_temperature(guided_logits(model, z, labels, settings, x), taus[i - 1], banned)  # l / tau, banned -inf
        if top_p < 1.0:
            keep = top_p_mask(lg.reshape(B * T, -1), top_p, k=settings.top_k_prefilter).reshape(lg.shape)
            lg = lg.masked_fill(~keep, float("-inf"))
        pert = lg.double() + draw_gumbel(gens, T, lg.shape[-1]).to(dev)
        prop = pert.argmax(-1)
        score = torch.log_softmax(pert, dim=-1).gather(-1, prop.unsqueeze(-1)).squeeze(-1)
        masked = (x == mask_id) & ~fixed
        revealed = ~masked & ~fixed
        score = torch.where(revealed, score * float(settings.eta), score)
        score = score.masked_fill(fixed, float("inf"))
        n_mask = torch.floor(free * (1.0 - kappa(settings.kappa, i / K))).long()
        # Rank of each position in ascending score order (stable: ties go to the lower position).
        order = torch.sort(score, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, pos)
        remain = (rank < n_mask.unsqueeze(1)) & ~fixed  # R^(i)
        newly = masked & ~remain  # A^(i)
        x = torch.where(remain, torch.full_like(x, int(mask_id)), torch.where(newly, prop, x))
        if trace is not None:
            trace.append({"step": i, "masked_before": masked.cpu(), "proposals": prop.cpu(), "scores": score.cpu(),
                          "masked_after": remain.cpu(), "x": x.cpu()})
    still = (x == mask_id) & ~fixed
    return torch.where(still, prop, x)


@torch.no_grad()
def sample_p2_self(model, meta: dict, indices: Sequence[int], settings: SampleSettings, *, batch_size: int = 32,
                   device="cpu", vocab_limit: Optional[int] = None, progress=None,
                   trace: Optional[list] = None) -> torch.Tensor:
    """Draw samples ``indices`` from a masked denoiser with P2-self (K = settings.steps); ids [N, T]."""
    if meta.get("kind") != "masked" or meta.get("mask_token_id") is None:
        raise ValueError("P2-self needs a masked denoiser export (meta kind 'masked' with a mask_token_id)")
    banned = banned_ids(meta, vocab_limit, device)
    mask_id = int(meta["mask_token_id"])
    return sample_batches(lambda z, gens, labels: p2_self_batch(model, z, gens, mask_id, settings, banned, trace=trace,
                                                                labels=labels),
                          model, meta, indices, settings, batch_size, device, progress)


def sample_any(model, meta: dict, indices: Sequence[int], settings: SampleSettings, **kw) -> torch.Tensor:
    """One-step generator -> one forward pass; masked denoiser -> P2-self with K = settings.steps
    (K = 1 is its one-step decoding). Returns tokenizer ids: an export with a compact vocabulary
    (``meta["vocab"]``, ``data.vocab: corpus``) samples its head rows below the compact size only
    (padding rows and the mask token lie above it) and maps them back."""
    from ..data.vocab import CompactVocab

    vocab = CompactVocab.from_meta(meta.get("vocab"))
    if vocab is not None:
        limit = kw.get("vocab_limit")
        kw["vocab_limit"] = vocab.size if limit is None else min(int(limit), vocab.size)
    if meta.get("kind", "onestep") == "masked":
        ids = sample_p2_self(model, meta, indices, settings, **kw)
    elif int(settings.steps) != 1:
        raise ValueError(f"steps={settings.steps}: few-step sampling needs a masked denoiser, this export is "
                         f"kind '{meta.get('kind')}'")
    else:
        from .onestep import sample_onestep

        ids = sample_onestep(model, meta, indices, settings, **kw)
    return ids if vocab is None else vocab.to_full(ids)

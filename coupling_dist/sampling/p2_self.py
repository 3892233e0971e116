"""Few-step sampling from a latent-conditioned masked denoiser H(z, x_t) -> logits [B, T, V]:
the P2-self sampler (path planning with the denoiser as its own planner).

Per sample, z ~ N(0, s^2 I) is drawn once and kept fixed for all K steps. Start fully masked.
For step i = 1..K (t = i / K):
1. logits = H(z, x) tempered by tau_i (banned ids: the mask token, ids beyond the tokenizer);
2. proposals at every position: one exact draw from the top-p nucleus of softmax(logits / tau_i)
   (the law Gumbel-max at temperature tau_i samples from, drawn by inverse CDF with one
   uniform per position so that a step costs [B, T] random numbers, not [B, T, V]);
3. candidate x' = proposal at masked positions, the current token at revealed positions;
   score = log softmax(logits / tau_i)[x'] and, for previously revealed positions, score * eta
   (eta > 1 makes revealed tokens easier to remask, eta = 0 never remasks them before masked ones);
   fixed positions (prompts) score +inf and are never masked;
4. keep masked the n_i = floor(L * (1 - kappa(t))) lowest-scored non-fixed positions (L = number
   of non-fixed positions; ties broken by position), reveal every other position with x'.
kappa(1) = 1, so the last step reveals everything; with K = 1 the single step reveals all
proposals of H(z, all-mask): exactly one-step decoding of that model with the same random stream
(the generator draws z, then one uniform per position, like ``onestep.sample_onestep``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .onestep import SampleSettings, banned_ids, draw_uniforms, sample_batches
from .top_p import apply_temperature, sample_top_p, token_log_probs


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


@torch.no_grad()
def p2_self_batch(model, z: torch.Tensor, gens: Sequence[torch.Generator], mask_id: int, settings: SampleSettings,
                  banned: Optional[torch.Tensor] = None, fixed: Optional[torch.Tensor] = None,
                  x_init: Optional[torch.Tensor] = None, trace: Optional[list] = None) -> torch.Tensor:
    """Run P2-self for one batch. z [B, T, d] on the model's device; ``gens`` are the samples'
    generators positioned after the latent draw. ``fixed`` [B, T] bool marks given positions whose
    tokens come from ``x_init``. If ``trace`` is a list, one dict per step is appended."""
    B, T = z.shape[0], z.shape[1]
    dev = z.device
    K = int(settings.steps)
    taus = step_temperatures(settings.temperature, K)
    fixed = torch.zeros(B, T, dtype=torch.bool, device=dev) if fixed is None else fixed.to(dev)
    x = torch.full((B, T), int(mask_id), dtype=torch.long, device=dev)
    if x_init is not None:
        x = torch.where(fixed, x_init.to(dev), x)
    free = (~fixed).sum(1).double()
    pos = torch.arange(T, device=dev).expand(B, T)
    for i in range(1, K + 1):
        u = draw_uniforms(gens, T)
        lg = apply_temperature(model(z, x), taus[i - 1], banned)
        prop = sample_top_p(lg.reshape(B * T, -1), u.reshape(-1), settings.top_p,
                            k=settings.top_k_prefilter).reshape(B, T)
        masked = (x == mask_id) & ~fixed
        revealed = ~masked & ~fixed
        cand = torch.where(masked, prop, x)
        score = token_log_probs(lg, cand).double()
        score = torch.where(revealed, score * float(settings.eta), score)
        score = score.masked_fill(fixed, float("inf"))
        n_mask = torch.floor(free * (1.0 - kappa(settings.kappa, i / K))).long()
        # Rank of each position in ascending score order (stable: ties go to the lower position).
        order = torch.sort(score, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, pos)
        new_mask = (rank < n_mask.unsqueeze(1)) & ~fixed
        x = torch.where(new_mask, torch.full_like(cand, int(mask_id)), cand)
        if trace is not None:
            trace.append({"step": i, "masked_before": masked.cpu(), "proposals": prop.cpu(), "scores": score.cpu(),
                          "masked_after": new_mask.cpu(), "x": x.cpu()})
    return x


@torch.no_grad()
def sample_p2_self(model, meta: dict, indices: Sequence[int], settings: SampleSettings, *, batch_size: int = 32,
                   device="cpu", vocab_limit: Optional[int] = None, progress=None,
                   trace: Optional[list] = None) -> torch.Tensor:
    """Draw samples ``indices`` from a masked denoiser with P2-self (K = settings.steps); ids [N, T]."""
    if meta.get("kind") != "masked" or meta.get("mask_token_id") is None:
        raise ValueError("P2-self needs a masked denoiser export (meta kind 'masked' with a mask_token_id)")
    banned = banned_ids(meta, vocab_limit, device)
    mask_id = int(meta["mask_token_id"])
    return sample_batches(lambda z, gens: p2_self_batch(model, z, gens, mask_id, settings, banned, trace=trace),
                          model, meta, indices, settings, batch_size, device, progress)


def sample_any(model, meta: dict, indices: Sequence[int], settings: SampleSettings, **kw) -> torch.Tensor:
    """One-step generator -> one forward pass; masked denoiser -> P2-self with K = settings.steps
    (K = 1 is its one-step decoding)."""
    if meta.get("kind", "onestep") == "masked":
        return sample_p2_self(model, meta, indices, settings, **kw)
    if int(settings.steps) != 1:
        raise ValueError(f"steps={settings.steps}: few-step sampling needs a masked denoiser, this export is "
                         f"kind '{meta.get('kind')}'")
    from .onestep import sample_onestep

    return sample_onestep(model, meta, indices, settings, **kw)

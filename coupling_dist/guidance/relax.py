"""Relaxations rho of a generator's logits into a differentiable "sample" (the paper's Appendix F.1),
through which the reward's gradient reaches z (classifier guidance) or the weights (fine-tuning).

``relax(logits, kind, tau, generator=None) -> [..., V]`` probabilities, differentiable in logits:

- ``softmax``: softmax(l / tau), deterministic, low-variance gradients. For a two-id alphabet
  (binary pixels) this IS the paper's sigmoid relaxation: softmax([l0, l1] / tau)[1] =
  sigmoid((l1 - l0) / tau), the probability of the pixel being 1 (and row 0 is 1 minus it).
- ``gumbel``: Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017), softmax((l + g) / tau) with
  g = -log(-log u), u ~ U(0, 1) drawn from ``generator``; follows the categorical sampling path
  more closely, noisier gradients. For two ids it is the binary-concrete relaxation of the paper's
  code (logistic noise = the difference of two Gumbels).
- ``straight_through``: forward exactly one_hot(argmax l) (the discrete decode at temperature -> 0,
  as the paper's code's "st"), backward the gradient of softmax(l / tau). Deterministic; the
  forward value is bit-exact one-hot (hard + (soft - soft.detach()) adds an exact zero).

``generator``: a ``torch.Generator`` for the whole batch, or a list of one per row (the samplers'
per-sample generators: a row's noise then does not depend on which rows share its batch). Only
``gumbel`` draws noise; the others ignore it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

KINDS = ("softmax", "gumbel", "straight_through")
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def uniforms(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """U(0, 1) of ``shape`` from one generator, or row i from ``generator[i]`` (a list of len shape[0])."""
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=gdev, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    return torch.stack([torch.rand(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
                        for g in generator])


def gumbel_noise(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    u = uniforms(shape, generator, device, dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - torch.finfo(dtype).eps)))


def relax(logits: torch.Tensor, kind: str = "softmax", tau: float = 1.0,
          generator: Optional[Generators] = None) -> torch.Tensor:
    """rho(logits): probabilities [..., V] (module docstring). Computed in float32 at least."""
    if kind not in KINDS:
        raise ValueError(f"unknown relaxation {kind!r} (sample.classifier.relaxation: one of {list(KINDS)})")
    if not tau > 0:
        raise ValueError(f"the relaxation temperature must be > 0 (sample.classifier.tau); got {tau}")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if kind == "gumbel":
        x = x + gumbel_noise(x.shape, generator, x.device, x.dtype)
    soft = torch.softmax(x / tau, dim=-1)
    if kind != "straight_through":
        return soft
    hard = F.one_hot(x.argmax(-1), x.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())

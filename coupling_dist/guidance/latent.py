"""Latent classifier guidance (the paper's Algorithm 5): move the latent, not the generator.

    z^0 ~ N(0, I)
    for k = 0 .. K-1:   l^k = G(z^k, y);  x~^k = rho(l^k);  z^{k+1} = z^k + eta * grad_{z^k} R(x~^k, y)
    final decode:       l^K = G(z^K, y), then the usual parallel categorical sampling (the caller's)

``classifier_guided_latents(model, z, labels, reward, steps, step_size, relaxation, tau)`` returns
z^K. R is ``guidance.reward.Reward`` (log p(y | x~) of the frozen reward classifier), rho is
``guidance.relax.relax``. Each sample ascends its OWN reward: the gradient is that of the sum of
the batch's rewards, so sample i's step is eta * grad R_i whatever the batch size (the paper's
code differentiates the batch mean, i.e. a step eta / B). The logits are restricted to the reward's
vocabulary before rho (the rows the sampler may emit; for softmax this equals relaxing all head
rows and renormalising).

The generator is frozen for the duration: its parameters' ``requires_grad`` is switched off (and
restored afterwards, also on an error), so no parameter gradient is computed or accumulated and the
weights are untouched; only z carries a gradient. The model's train / eval mode is the caller's
(sampling uses eval). The config (``sample.classifier``) is read by ``latent_guidance_settings``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .relax import Generators, relax


def latent_guidance_settings(cfg) -> dict:
    """``sample.classifier`` as keyword arguments: path (the reward classifier; default
    ``classifier.out``, i.e. run.dir/classifier/export), steps (K), step_size (eta), relaxation, tau."""
    from ..components.paths import guidance_classifier

    c = cfg.sample.classifier
    return {"path": guidance_classifier(cfg), "steps": int(c.steps), "step_size": float(c.step_size),
            "relaxation": c.relaxation, "tau": float(c.tau)}


def guided_reward(model, z: torch.Tensor, labels: torch.Tensor, reward, relaxation: str = "softmax",
                  tau: float = 1.0, generator: Optional[Generators] = None, x_t=None) -> torch.Tensor:
    """R(rho(G(z, y)), y) per row [B] (differentiable in z when z requires grad)."""
    logits = model(z, x_t, labels=labels)
    return reward(relax(logits[..., :reward.vocab_size], relaxation, tau, generator), labels)


def classifier_guided_latents(model, z: torch.Tensor, labels: torch.Tensor, reward, steps: int, step_size: float,
                              relaxation: str = "softmax", tau: float = 1.0, generator: Optional[Generators] = None,
                              x_t=None, trace: Optional[list] = None) -> torch.Tensor:
    """z^K of Algorithm 5 (module docstring). ``generator``: the Gumbel noise's (relaxation gumbel);
    ``trace``: if a list, each step's rewards R(x~^k, y) [B] (detached, k = 0 .. K-1) are appended."""
    if steps < 0 or not step_size > 0:
        raise ValueError(f"classifier guidance needs steps >= 0 and step_size > 0 (got {steps}, {step_size})")
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    z = z.detach()
    try:
        for p in params:
            p.requires_grad_(False)
        for _ in range(int(steps)):
            zk = z.clone().requires_grad_(True)
            with torch.enable_grad():
                r = guided_reward(model, zk, labels, reward, relaxation, tau, generator, x_t)
                (grad,) = torch.autograd.grad(r.sum(), zk)
            if trace is not None:
                trace.append(r.detach())
            z = (zk + step_size * grad).detach()
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)
    return z

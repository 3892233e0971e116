"""Classifier-free guidance in one step (the paper's Algorithm 4).

    l = l_u + s * (l_c - l_u),   l_c = G(z, y),  l_u = G(z, null)

then the usual parallel categorical sampling of every position from l (temperature, top-p). The
same G gives both logits because it was trained with conditioning dropout (``stage_b.cond_dropout``).
s = 1 is the conditional model and s = 0 the unconditional one: those two cases take one
evaluation and return that evaluation's logits exactly; any other s takes two. Rows whose label is
-1 (no class) get l_c = l_u, i.e. their unconditional logits for any s.

Works for every generator kind (one-step, masked denoiser with its partially masked ``x_t``, the
composite D(NF^-1(z; y)), and Stage A's own sampler): they all take ``model(z, x_t, labels=...)``.
"""
from __future__ import annotations

from typing import Optional

import torch


def cfg_logits(model, z: torch.Tensor, labels: torch.Tensor, scale: float,
               x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Guided logits [B, T, V] of ``model`` at latents z for classes ``labels`` [B] (Algorithm 4)."""
    if not getattr(model, "num_classes", 0):
        raise ValueError("classifier-free guidance needs a class-conditional generator (trained with "
                         "data.num_classes > 0); this one is unconditional")
    if labels is None:
        raise ValueError("classifier-free guidance needs labels (the classes to guide towards)")
    s = float(scale)
    if s == 1.0:
        return model(z, x_t, labels=labels)
    if s == 0.0:
        return model(z, x_t, labels=None)
    uncond = model(z, x_t, labels=None).float()  # the difference in float32 whatever the model's dtype
    cond = model(z, x_t, labels=labels).float()
    return uncond + s * (cond - uncond)

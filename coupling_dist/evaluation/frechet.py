"""Fréchet distances through torchmetrics (the implementation the paper's MNIST FID uses, G.1).

``frechet_distance`` hands torchmetrics' ``FrechetInceptionDistance`` a custom feature extractor:
an adapter around a feature net (``evaluation.feature_net``) that maps token ids [N, L] to its
penultimate features. torchmetrics (1.9) accepts any ``nn.Module`` as ``feature``; it reads the
feature width from the module's ``num_features`` (otherwise it would probe it with a dummy
3x299x299 image, which a token model cannot take), passes ``update``'s tensor through unchanged
(``normalize`` only rescales for its own Inception), accumulates the feature sums and outer products
in float64 and computes ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) itself.

``inception_fid`` is the standard FID with torch-fidelity's Inception weights -- only when
torch-fidelity is installed and its weights file is already in the torch hub cache (nothing is
ever downloaded); otherwise it returns None and callers report the classifier-space distance.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .feature_net import as_token_tensor

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class TokenFeatures(nn.Module):
    """The adapter torchmetrics calls: token ids -> ``net.features`` as float64 (so the distance it
    returns, cast back to the features' dtype, stays float64), never trained."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = int(net.num_features)

    def train(self, mode: bool = True) -> "TokenFeatures":
        return super().train(False)  # torchmetrics' Metric.train() must not put the net in train mode

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net.features(tokens).double()


def _batches(tokens, vocab: int, batch_size: int, what: str):
    t = as_token_tensor(tokens, vocab)
    if len(t) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 {what} samples; got {len(t)}")
    return t.split(batch_size)


def frechet_distance(net: nn.Module, real_tokens, fake_tokens, batch_size: int = 256) -> float:
    """Fréchet distance between the Gaussians fitted to ``net.features`` of the two token sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    was = net.training
    net.eval()
    metric = FrechetInceptionDistance(feature=TokenFeatures(net), reset_real_features=True, normalize=False)
    try:
        for b in _batches(real_tokens, net.vocab, batch_size, "real"):
            metric.update(b, real=True)
        for b in _batches(fake_tokens, net.vocab, batch_size, "fake"):
            metric.update(b, real=False)
        return float(metric.compute())
    finally:
        net.train(was)


def inception_weights_path() -> Optional[str]:
    """torch-fidelity's Inception weights in the local torch hub cache, or None."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
    return path if os.path.isfile(path) else None


def _as_rgb_uint8(images) -> torch.Tensor:
    """Binary (or 0..1 grey) images [N, H*W] (square) or [N, H, W] -> uint8 [N, 3, H, W] in 0..255."""
    x = images.float() if torch.is_tensor(images) else torch.tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 2:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"flattened images must be square; got {x.shape[1]} pixels")
        x = x.reshape(len(x), side, side)
    if x.dim() != 3:
        raise ValueError(f"expected images [N, H*W] or [N, H, W]; got {tuple(x.shape)}")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def inception_fid(real_images, fake_images, batch_size: int = 64) -> Optional[float]:
    """The standard 2048-d Inception FID, or None when torch-fidelity or its local weights are absent."""
    weights = inception_weights_path()
    if weights is None:
        return None
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception comes from it)
    except ImportError:
        return None
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    for imgs, real in ((real_images, True), (fake_images, False)):
        x = _as_rgb_uint8(imgs)
        if len(x) < 2:
            raise ValueError(f"FID needs at least 2 {'real' if real else 'fake'} images; got {len(x)}")
        for b in x.split(batch_size):
            metric.update(b, real=real)
    return float(metric.compute())

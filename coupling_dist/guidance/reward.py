"""The reward R(x~, y) = log p(y | x~) of the frozen reward classifier (``python -m
coupling_dist.classifier``), evaluated on relaxed samples x~ (``guidance/relax.py``) so that it is
differentiable in them: the R of Algorithms 5 (latent classifier guidance) and 6 (reward
fine-tuning).

``load_reward(path, domain, meta) -> Reward``; ``reward(probs, labels) -> [B]`` where ``probs`` is
[B, T, V'] in the GENERATOR's terms: its token order and its head rows (V' >= the domain's
vocabulary; a Stage B head has extra rows -- padding to a TP-friendly size, a masked denoiser's mask
token). The reward

1. keeps the first ``vocab_size`` rows (the domain's ids; binary images: rows 0 / 1 = pixel values
   0 / 1) and renormalises them to sum to one per position (a no-op for probabilities already
   restricted to the vocabulary; for straight-through one-hots it is exact);
2. permutes the positions from the model's token order to the classifier's (the permutation
   ``domain.feature_tokens`` applies to token rows: binary images with ``stage_a.patch`` = 16 store
   4x4 patches, the digit classifier reads raster order; DNA: the identity);
3. feeds the [B, T, V] soft one-hot to the classifier (``evaluation/feature_net``: soft inputs) and
   returns log_softmax(logits)[y].

On the one-hot of real ids it equals the classifier's log-probability of the ids exactly. The
classifier's parameters are frozen (``requires_grad`` False), so a backward pass accumulates no
gradient in them.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..components.preflight import InputError
from ..evaluation.feature_net import META, load_feature_net

FIX = "run `python -m coupling_dist.classifier --config FILE` first, or set sample.classifier.path"


def resolve_classifier_dir(path: str) -> str:
    """``path`` itself when it holds a saved classifier, else ``path/export`` (the stage directory
    ``run.dir/classifier`` names the classifier it exported); ``InputError`` when neither does."""
    for cand in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(cand, META)):
            return cand
    raise InputError(f"no reward classifier at {path} (no {META} there or in {os.path.join(path, 'export')}): {FIX}")


def feature_permutation(domain, seq_len: int) -> Optional[torch.Tensor]:
    """perm with classifier_row[:, j] = model_row[:, perm[j]] (``domain.feature_tokens`` on the ids
    0..T-1), or None for the identity. Refuses a ``feature_tokens`` that is not a permutation."""
    perm = np.asarray(domain.feature_tokens(np.arange(seq_len, dtype=np.int64)[None]))[0]
    if sorted(perm.tolist()) != list(range(seq_len)):
        raise ValueError(f"domain {domain.name}: feature_tokens is not a permutation of the {seq_len} positions")
    return None if np.array_equal(perm, np.arange(seq_len)) else torch.from_numpy(perm.astype(np.int64))


class Reward:
    """log p(y | x~) of a frozen classifier on soft inputs in the generator's terms (module docstring)."""

    def __init__(self, net: torch.nn.Module, vocab_size: int, perm: Optional[torch.Tensor] = None):
        self.net, self.vocab_size, self.perm = net.eval(), int(vocab_size), perm
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.n_classes, self.seq_len = int(net.n_classes), int(net.length)
        self.meta = dict(getattr(net, "meta", {}) or {})

    def to(self, device) -> "Reward":
        self.net.to(device)
        if self.perm is not None:
            self.perm = self.perm.to(device)
        return self

    def classifier_input(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, T, V'] model order, head rows -> [B, T, vocab] classifier order, rows summing to 1."""
        if probs.dim() != 3 or probs.shape[1] != self.seq_len or probs.shape[2] < self.vocab_size:
            raise ValueError(f"the reward takes probabilities [B, {self.seq_len}, >= {self.vocab_size}]; "
                             f"got {tuple(probs.shape)}")
        p = probs[..., :self.vocab_size]
        if probs.shape[2] > self.vocab_size:
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        if self.perm is not None:
            p = p.index_select(1, self.perm.to(p.device))
        return p

    def __call__(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(device=probs.device, dtype=torch.long).view(-1)
        if len(labels) != probs.shape[0]:
            raise ValueError(f"{probs.shape[0]} rows but {len(labels)} labels")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(f"reward labels must lie in [0, {self.n_classes}); got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        w = self.net.fc.weight
        logits = self.net(self.classifier_input(probs).to(device=w.device, dtype=w.dtype))
        return F.log_softmax(logits.float(), -1).gather(1, labels.to(logits.device)[:, None])[:, 0]


def load_reward(path: str, domain, meta: Optional[dict] = None, device="cpu") -> Reward:
    """The reward of the classifier saved at ``path`` (a classifier directory or the stage directory
    holding ``export/``) for generator exports of ``domain`` described by ``meta`` (the export's
    meta: ``seq_len``, ``vocab_size`` = head rows; None: the domain's own shapes)."""
    where = resolve_classifier_dir(path)
    try:
        net = load_feature_net(where)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{where}: not a loadable reward classifier ({e}); {FIX}") from None
    kind = getattr(net, "kind", None)
    if domain.feature_net is not None and kind != domain.feature_net:
        raise InputError(f"{where}: a {kind} classifier, but data.domain {domain.name} uses {domain.feature_net}; {FIX}")
    if net.vocab != domain.vocab_size:
        raise InputError(f"{where}: the classifier reads {net.vocab} ids, data.domain {domain.name} has "
                         f"{domain.vocab_size}; {FIX}")
    seq_len = int((meta or {}).get("seq_len") or domain.cfg.data.seq_len)
    if net.length != seq_len:
        raise InputError(f"{where}: the classifier reads sequences of {net.length} tokens, the generator makes "
                         f"{seq_len}; {FIX}")
    head = (meta or {}).get("vocab_size")
    if head is not None and int(head) < net.vocab:
        raise InputError(f"{where}: the generator's head has {head} rows, fewer than the {net.vocab} ids the "
                         f"classifier reads")
    return Reward(net, net.vocab, feature_permutation(domain, seq_len)).to(device)

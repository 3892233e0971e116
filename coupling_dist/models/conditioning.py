"""Class conditioning shared by every model that takes a class label (``data.num_classes`` > 0).

Labels are a LongTensor [B] (or None). An entry in [0, num_classes) is a class; -1 is the null
class ("no label": the row is unconditional), and ``labels=None`` means every row is unconditional.
A class embedding has ``num_classes + 1`` rows, the last one the null class, so a single model
gives both the conditional and the unconditional prediction (classifier-free guidance,
``guidance/cfg.py``), trained with conditioning dropout (``drop_labels``).

A model with ``num_classes == 0`` holds no embedding and refuses labels (``class_rows`` raises a
``ValueError`` naming ``data.num_classes``): a label silently ignored would make guided sampling of
an unconditional export look like it works.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NULL = -1  # the null class in a labels tensor


def class_rows(labels: Optional[torch.Tensor], num_classes: int, batch: int, device) -> torch.Tensor:
    """Embedding rows [B] of ``labels``: the class, or ``num_classes`` (the null row) for -1 / None."""
    if labels is None:
        return torch.full((batch,), int(num_classes), dtype=torch.long, device=device)
    if not num_classes:
        raise ValueError("labels were given to an unconditional model (trained with data.num_classes = 0); "
                         "sample it without sample.label / sample.guidance, or train with data.num_classes > 0")
    labels = torch.as_tensor(labels, device=device).reshape(-1).long()
    if labels.shape[0] != batch:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {batch}")
    bad = (labels < NULL) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"label {int(labels[bad][0])} is outside [0, {num_classes}) (data.num_classes = {num_classes}; "
                         f"-1 = no label)")
    return torch.where(labels == NULL, torch.full_like(labels, int(num_classes)), labels)


class ClassEmbedding(nn.Module):
    """``num_classes + 1`` learned rows of width ``dim`` (the last = the null class). Not a TP-swapped
    name (``distributed/tensor_parallel.py``): replicated on every tensor-parallel rank."""

    def __init__(self, num_classes: int, dim: int, std: float):
        super().__init__()
        self.num_classes = int(num_classes)
        self.table = nn.Embedding(self.num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=std)

    def forward(self, labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """[B, dim] embeddings of ``labels`` (None / -1: the null row)."""
        rows = class_rows(labels, self.num_classes, batch, self.table.weight.device)
        return self.table(rows)


def drop_labels(labels: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Conditioning dropout: each label replaced by the null class (-1) with probability ``p``; the
    draw is one uniform per row from ``generator`` (None: the global RNG), on the CPU."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, NULL), labels)


def batch_labels(batch: dict) -> torch.Tensor:
    """The shard field ``label`` (int16 [B, 1]) of a loader batch as a LongTensor [B]."""
    return batch["label"].reshape(-1).long()

"""Tensors <-> stored arrays: float16/float32 as they are, bfloat16 as its uint16 bit pattern
(numpy has no bfloat16; ``data_shards/FORMAT.md``)."""
from __future__ import annotations

import numpy as np
import torch


def to_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return t.to(getattr(torch, dtype)).cpu().numpy()


def from_stored(a, dtype: str = "") -> torch.Tensor:
    """float32 tensor from a stored array (uint16 bit patterns are read as bfloat16)."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if t.dtype in (torch.uint16, torch.int16) and dtype in ("", "bfloat16"):
        return t.view(torch.bfloat16).float()
    return t.float()

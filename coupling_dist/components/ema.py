"""Exponential moving average of the parameters, sharded by parameter across data-parallel ranks.

Choice (documented because ZeRO makes it non-obvious): every parameter's EMA is a *full* fp32
tensor kept by exactly one data-parallel rank, its owner (parameter index mod DP size). So
- memory per rank is ~1/DP of one fp32 model copy, like the ZeRO optimizer state;
- the saved shards are keyed by parameter name and hold full tensors, so a checkpoint written at
  one DP size loads at another (each rank reads every shard and keeps the names it now owns);
- ZeRO 0/1/2: every rank holds the full (updated) parameters, so owners update from them with no
  communication; ZeRO-3: parameters are partitioned, so the update gathers them in chunks with
  ``deepspeed.zero.GatheredParameters`` (one extra all-gather of the model per step, inside the DP
  group) and the owner reads the gathered values.
Under tensor parallelism each TP rank has its own slices with the same names; ownership and the
gathers run in the data-parallel group, so the EMA of a TP slice stays on that TP rank (the
checkpoint keys shards by the model-parallel rank).
The EMA starts equal to the initial weights and updates as ``e = d * e + (1 - d) * p`` after each
optimizer step. It reads the working parameters (bf16 under bf16 training; exact under fp32).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

GATHER_CHUNK_ELEMENTS = 50_000_000


def _zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


class EMA:
    def __init__(self, module: nn.Module, decay: float, dp_rank: int = 0, dp_world: int = 1, dp_group=None):
        self.module, self.decay = module, float(decay)
        self.dp_rank, self.dp_world, self.dp_group = dp_rank, dp_world, dp_group
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.owned = {n for i, (n, _) in enumerate(self.params) if i % dp_world == dp_rank}
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._visit(lambda name, full: self.shadow.__setitem__(name, full.detach().float().clone()))

    def _chunks(self) -> Iterable[list]:
        chunk, size = [], 0
        for item in self.params:
            chunk.append(item)
            size += item[1].ds_numel if _zero3(item[1]) else item[1].numel()
            if size >= GATHER_CHUNK_ELEMENTS:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def _visit(self, fn) -> None:
        """Call ``fn(name, full_tensor)`` for every owned parameter, gathering under ZeRO-3
        (every rank of the DP group must call this: the gather is a collective)."""
        for chunk in self._chunks():
            partitioned = [p for _, p in chunk if _zero3(p)]
            if partitioned:
                import deepspeed

                with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                    for n, p in chunk:
                        if n in self.owned:
                            fn(n, p.data)
            else:
                for n, p in chunk:
                    if n in self.owned:
                        fn(n, p.data)

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay

        def upd(name, full):
            self.shadow[name].mul_(d).add_(full.float(), alpha=1.0 - d)

        self._visit(upd)
        self.num_updates += 1

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """This rank's shard (owned names only, full tensors)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_shards(self, shards: list[dict]) -> None:
        """Load from the shards of every rank of a checkpoint (any DP size)."""
        merged: dict[str, torch.Tensor] = {}
        for sd in shards:
            merged.update(sd["shadow"])
        missing = sorted(self.owned - set(merged))
        if missing:
            raise KeyError(f"EMA checkpoint lacks parameters {missing[:5]} (model changed since it was saved?)")
        for name in self.owned:
            if merged[name].shape != self.shadow[name].shape:
                raise ValueError(f"EMA '{name}': saved shape {tuple(merged[name].shape)} != "
                                 f"model shape {tuple(self.shadow[name].shape)}")
            self.shadow[name] = merged[name].float().clone()
        self.num_updates = int(shards[0]["num_updates"]) if shards else 0

    def full_state_dict(self, dst: int = 0) -> Optional[dict[str, torch.Tensor]]:
        """All EMA tensors on DP rank ``dst`` (None elsewhere). Collective over the DP group."""
        if self.dp_world == 1:
            return dict(self.shadow)
        out: list = [None] * self.dp_world if self.dp_rank == dst else None
        dst_global = dist.get_global_rank(self.dp_group, dst) if self.dp_group is not None else dst
        dist.gather_object(self.shadow, out, dst=dst_global, group=self.dp_group)
        if self.dp_rank != dst:
            return None
        merged = {}
        for part in out:
            merged.update(part)
        return {n: merged[n] for n, _ in self.params}

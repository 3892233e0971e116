"""A model's parallel layout, applied in one place (as torchtitan's ``parallelize_*`` functions do).

Model code (``models/``) is plain PyTorch and knows nothing about parallelism. A training stage
asks for its layout here:

1. ``build_parallel_dims(tp, seed)`` (collective, once per process): with ``tp > 1`` megatron-core's
   tensor-parallel x data-parallel groups (``parallel_state.init_parallel``) and the mpu adapter
   that hands them to DeepSpeed (ZeRO over the DP group) and to the Trainer (layout, EMA group);
   with ``tp == 1`` no extra groups: data parallel over the whole world.
2. ``parallelize(model, dims, activation_checkpointing=...)`` on the freshly built plain model:
   the tensor-parallel layer swap (``tensor_parallel.apply_tensor_parallel``: megatron Column/Row
   parallel linears and a vocab-parallel head holding this rank's shards of the plain weights)
   when ``dims.tp > 1``, then activation checkpointing (every ``models.layers.Transformer``
   recomputes its blocks in backward).

Stage B uses both steps; Stage A (no TP) uses step 2 with ``ParallelDims()``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from ..components import dist as D


@dataclasses.dataclass
class ParallelDims:
    tp: int = 1
    mpu: Optional[object] = None  # parallel_state.MegatronMPU when tp > 1

    @property
    def dp_rank(self) -> int:
        return self.mpu.get_data_parallel_rank() if self.mpu is not None else D.rank()

    @property
    def dp_world(self) -> int:
        return self.mpu.get_data_parallel_world_size() if self.mpu is not None else D.world_size()


def build_parallel_dims(tp: int, seed: int = 0) -> ParallelDims:
    if tp <= 1:
        return ParallelDims()
    from .parallel_state import init_parallel

    return ParallelDims(tp=tp, mpu=init_parallel(tp, seed=seed))


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block of ``model`` in backward; returns how many stacks."""
    from ..models.layers import Transformer

    stacks = [m for m in model.modules() if isinstance(m, Transformer)]
    for m in stacks:
        m.checkpoint_blocks = True
    return len(stacks)


def parallelize(model: nn.Module, dims: ParallelDims, *, activation_checkpointing: bool = False) -> nn.Module:
    if dims.tp > 1:
        if dims.mpu is None:
            raise RuntimeError("parallelize: tp > 1 needs the parallel groups (build_parallel_dims) first")
        from .tensor_parallel import apply_tensor_parallel

        model = apply_tensor_parallel(model, dims.mpu.get_tensor_model_parallel_group())
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model

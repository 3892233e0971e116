"""Tensor-parallel x data-parallel layout: megatron-core ``parallel_state`` plus a DeepSpeed mpu.

``init_parallel(tp, seed)`` (collective; after ``components.dist.init_distributed``) builds
megatron's groups with TP size ``tp`` and DP = world / tp (order tp-dp: the ranks of a TP group
are consecutive, so a TP group stays inside a node when ranks are packed per node), seeds
megatron's model-parallel RNG tracker, and returns a ``MegatronMPU``: the object DeepSpeed takes as
``mpu=`` (ZeRO then partitions over the DP group, gradient norms count TP shards once) and the
Trainer reads for its layout and EMA group. megatron-core is imported here, lazily: nothing on
the sampling path imports this module.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..components import dist as D
from ..components.preflight import PreflightError
from . import megatron_shim


class ParallelLayoutError(PreflightError):
    """The requested TP size does not fit the world (raised before any work)."""


class MegatronMPU:
    """DeepSpeed/Trainer mpu adapter over megatron-core ``parallel_state`` (no pipeline stages:
    the model-parallel group is the tensor-parallel group)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    # model parallel == tensor parallel (pipeline size 1)
    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list:
        return list(dist.get_process_group_ranks(self.get_data_parallel_group()))

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return None

    def describe(self) -> dict:
        return {"tp": self.get_tensor_model_parallel_world_size(), "tp_rank": self.get_tensor_model_parallel_rank(),
                "dp": self.get_data_parallel_world_size(), "dp_rank": self.get_data_parallel_rank()}


def check_layout(tp: int, world: int) -> int:
    """DP size for ``tp`` on ``world`` ranks, or a clear error naming ``stage_b.tp``."""
    if tp < 1 or world % tp:
        raise ParallelLayoutError(f"stage_b.tp = {tp} does not divide the world size {world} "
                                  f"(DP = world / tp must be a whole number); choose a TP size that divides {world}")
    return world // tp


def init_parallel(tp: int, seed: int = 0) -> MegatronMPU:
    """Initialise (once) megatron's groups for TP size ``tp``; return the mpu adapter."""
    D.init_distributed()
    world = D.world_size()
    check_layout(tp, world)
    megatron_shim.apply()  # no-op with CUDA
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        have = ps.get_tensor_model_parallel_world_size()
        if have != tp:
            raise ParallelLayoutError(f"model parallel already initialised with TP {have}, asked for stage_b.tp = {tp}")
    else:
        timeout_min = max(1, int(float(os.environ.get("COUPLING_DIST_TIMEOUT_S", "300")) // 60))
        # gloo groups are the default groups on CPU already; megatron's extra gloo copies are not needed
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, distributed_timeout_minutes=timeout_min,
                                     create_gloo_process_groups=torch.cuda.is_available())
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return MegatronMPU()

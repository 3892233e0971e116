"""``python -m coupling_dist.stage_b --config FILE [overrides]``: train the Stage B generator, export it.

Launchers (the same training function ``train(cfg)`` runs on every rank):
- a plain process, ``torchrun``, ``srun``: ranks come from ``components.dist``;
- a Ray job driver (``ray job submit --address ... -- python -m coupling_dist.stage_b --config F``),
  or a single process with ``stage_b.ray_workers`` set: the driver checks the inputs, then
  ``components.ray_launch`` runs ``train`` as ``stage_b.ray_workers`` (default ``ray.num_workers``)
  ranks in Ray actors placed by a placement group, and returns the job's exit status.

Layout: ``stage_b.tp`` ranks per tensor-parallel group (megatron-core), DP = world / tp (DeepSpeed
ZeRO over the DP group, via the mpu adapter): ``distributed.parallelize``. Pre-flight before any
training (``preflight``, exit status 2 naming the key/path). Outputs: ``run.dir/stage_b/``
checkpoints (resumed automatically), metrics, and ``export/`` (EMA generator, safetensors +
config.json). Preemption (SIGTERM/SIGUSR1): checkpoint, exit 143/138.
"""
from __future__ import annotations

from ...components.logging import get_logger
from ...components.paths import generator_export
from ...components.training import build_loaders, start_training_rank, train_and_export
from ...config import Config
from .preflight import checked_task_info
from .task import StageBTask

LOG = get_logger("stage_b")


def train(cfg: Config) -> dict:
    """One rank of Stage B training (any launcher)."""
    task_info, dims = start_training_rank(cfg, "stage_b", cfg.stage_b.tp, checked_task_info, LOG)
    task = StageBTask(cfg, task_info, dims)
    # TP ranks of one group read the same data: the loaders are sharded by the DP rank only
    loaders = build_loaders(task_info["store"], task.fields(), cfg.stage_b.train.batch_size, cfg,
                            dims.dp_rank, dims.dp_world)
    summary, layout = train_and_export(cfg, "stage_b", task, loaders, generator_export(cfg),
                                       ("loss", "ce", "kd", "mfu"))
    summary.update(layout=dict(layout, tp=cfg.stage_b.tp))
    return summary


def main(cfg: Config) -> dict:
    from ...components.ray_launch import run_stage

    return run_stage(cfg, train, "stage_b", cfg.stage_b.ray_workers,
                     preflight=lambda world: checked_task_info(cfg, world))

"""``python -m coupling_dist.finetune --config FILE [overrides]``: reward fine-tuning (Algorithm 6).

Starts from a class-conditional generator export (``finetune.export``, default
``run.dir/stage_b/export``) and a frozen reward classifier (``finetune.reward``, default
``run.dir/classifier``, written by ``python -m coupling_dist.classifier``), and minimises
``-lambda_reward * R(rho(G_theta(z, y)), y) + lambda_anchor * anchor(theta, theta_0)`` over fresh
draws z ~ N(0, I), y (no data set: ``latents.py``) on the shared Trainer: DeepSpeed ZeRO over the
data-parallel ranks, ``finetune.tp`` tensor-parallel ranks per group, EMA, sharded checkpoints
with exact resume, preemption (SIGTERM/SIGUSR1: checkpoint, exit 143/138). Launchers as for
Stage B: a plain process, torchrun, srun, or Ray actors (``finetune.ray_workers``, or a
``ray job submit`` driver with ``ray.num_workers`` ranks).

Outputs (``run.dir/finetune/``): checkpoints, metrics, and ``export/`` in the generator export
format (its meta records the source export, the reward and the objective's settings), which
``sample.export=run.dir/finetune/export`` samples like any other generator.
"""
from __future__ import annotations

from ...components.logging import get_logger
from ...components.paths import finetune_export
from ...components.training import start_training_rank, train_and_export
from ...config import Config
from .preflight import checked_task_info
from .task import FinetuneTask

LOG = get_logger("finetune")


def train(cfg: Config) -> dict:
    """One rank of reward fine-tuning (any launcher)."""
    task_info, dims = start_training_rank(cfg, "finetune", cfg.finetune.tp, checked_task_info, LOG)
    LOG.info("fine-tuning %s (%d classes) against the reward %s", task_info["export"], task_info["num_classes"],
             task_info["reward"])
    task = FinetuneTask(cfg, task_info, dims)
    summary, layout = train_and_export(cfg, "finetune", task, task.loaders(), finetune_export(cfg),
                                       ("loss", "reward", "anchor", "reward_hard", "accuracy"))
    summary.update(layout=dict(layout, tp=cfg.finetune.tp), source_export=task_info["export"],
                   reward_classifier=task_info["reward"])
    return summary


def main(cfg: Config) -> dict:
    from ...components.ray_launch import run_stage

    return run_stage(cfg, train, "finetune", cfg.finetune.ray_workers,
                     preflight=lambda world: checked_task_info(cfg, world))

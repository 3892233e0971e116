"""What both training stages do around the Trainer: their loaders, and fit -> preempt -> export.

``build_loaders``: the train split and the first held-out split the shard set has, as
ShardLoaders sharded by the *data-parallel* rank (the TP ranks of one group read the same batches),
with the ``loader`` config section. ``train_and_export``: run the Trainer; on preemption close and
exit with its status (143/138, no export and no completion marker: the requeued job resumes from
the checkpoint); otherwise export (a collective: every rank calls ``task.export``) and return the
stage summary.
"""
from __future__ import annotations

from typing import Sequence

from . import dist as D
from .logging import MetricsLogger, get_logger
from .paths import stage_dir

LOG = get_logger("training")
HELDOUT_SPLITS = ("heldout", "valid", "validation", "test")


def start_training_rank(cfg, stage: str, tp: int, checked_task_info, log) -> tuple[dict, object]:
    """The prologue of a rank of a Trainer stage (Stage B, finetune): the process group, the stage's
    log, its pre-flight (``checked_task_info(cfg, world)``: raises on bad inputs) and the TP x DP
    layout. Returns (task_info, ParallelDims)."""
    from ..distributed.parallelize import build_parallel_dims
    from .logging import setup_logging

    info = D.init_distributed()
    setup_logging(stage_dir(cfg, stage), info["rank"])
    task_info = checked_task_info(cfg, D.world_size())
    dims = build_parallel_dims(tp, seed=cfg.run.seed)
    if dims.mpu is not None:
        log.info("parallel layout: %s", dims.mpu.describe())
    return task_info, dims


def build_loaders(shard_dir: str, fields: list[str], batch_size: int, cfg, dp_rank: int, dp_world: int):
    """(train loader, held-out loader or None) over ``shard_dir``."""
    from ..data.loader import ShardLoader
    from ..data.shards import Manifest

    lc = cfg.loader
    kw = dict(fields=fields, verify_checksums=lc.verify_checksums, skip_bad=lc.skip_bad,
              num_workers=lc.num_workers, prefetch=lc.prefetch)
    train = ShardLoader(shard_dir, "train", batch_size, cfg.run.seed, dp_rank, dp_world, **kw)
    splits = Manifest.load(shard_dir).splits
    held = next((s for s in HELDOUT_SPLITS if s in splits), None)
    if held is None:
        LOG.warning("no held-out split in %s: evaluation is skipped", shard_dir)
        return train, None
    return train, ShardLoader(shard_dir, held, batch_size, cfg.run.seed, dp_rank, dp_world, **kw)


def train_and_export(cfg, stage: str, task, loaders: tuple, export_dir: str,
                     summary_keys: Sequence[str]) -> tuple[dict, dict]:
    """(stage summary, the Trainer's layout); raises SystemExit(143/138) after a preemption."""
    from .trainer import Trainer

    out = stage_dir(cfg, stage)
    train_loader, heldout = loaders
    metrics = MetricsLogger(out, stage, cfg, enabled=D.is_main())
    trainer = Trainer(getattr(cfg, stage).train, task, train_loader, out, heldout_loader=heldout, run=cfg.run,
                      stage=stage, full_config=cfg.to_dict(), metrics=metrics)
    result = trainer.fit()
    if result.preempted is not None:
        trainer.close()
        raise SystemExit(result.exit_code)  # no completion marker: the requeued job resumes
    task.export(trainer, export_dir)  # collective (ZeRO-3 / TP gathers)
    D.barrier()
    trainer.close()
    summary: dict = {k: result.final_metrics[k] for k in summary_keys if k in result.final_metrics}
    summary.update(steps=result.step, checkpoint=result.last_checkpoint, export=export_dir)
    return summary, trainer.layout

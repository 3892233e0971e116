"""``python -m coupling_dist.stage_b --config FILE [overrides]``: train the Stage B generator, export it.

Launchers (the same training function ``train(cfg)`` runs on every rank):
- a plain process, ``torchrun``, ``srun``: ranks come from ``components.dist``;
- a Ray job driver (``ray job submit --address ... -- python -m coupling_dist.stage_b --config F``),
  or a single process with ``stage_b.ray_workers`` set: the driver checks the inputs, then
  ``components.ray_launch`` runs ``train`` as ``stage_b.ray_workers`` (default ``ray.num_workers``)
  ranks in Ray actors placed by a placement group, and returns the job's exit status.

Layout: ``stage_b.tp`` ranks per tensor-parallel group (megatron-core), DP = world / tp (DeepSpeed
ZeRO over the DP group, via the mpu adapter). Pre-flight before any training: the pair store
exists and its latent width equals ``stage_a.latent_dim``, the KD teacher exists and shares the
pair store's tokenizer, ``stage_b.tp`` divides the world size (exit status 2, naming the key/path).
Outputs: ``run.dir/stage_b/`` checkpoints (resumed automatically), metrics, and ``export/`` (EMA
generator, safetensors + config.json). Preemption (SIGTERM/SIGUSR1): checkpoint, exit 143/138.
"""
from __future__ import annotations

import os
from .cli import PreflightError, run_entry
from .components import dist as D
from .components.logging import get_logger
from .config import Config

LOG = get_logger("stage_b")
HELDOUT_SPLITS = ("heldout", "valid", "validation", "test")


def checked_task_info(cfg: Config, world: int) -> dict:
    from .distributed.parallel_state import ParallelLayoutError, check_layout
    from .stage_b_task import StageBPreflightError, preflight

    try:
        check_layout(cfg.stage_b.tp, world)
        info = preflight(cfg)
    except (StageBPreflightError, ParallelLayoutError) as e:
        raise PreflightError(str(e)) from None
    if cfg.stage_b.train.batch_size % (world // cfg.stage_b.tp):
        raise PreflightError(f"stage_b.train.batch_size ({cfg.stage_b.train.batch_size}) must be divisible by the "
                             f"data-parallel size {world // cfg.stage_b.tp} (world {world} / stage_b.tp {cfg.stage_b.tp})")
    return info


def build_loaders(cfg: Config, store: str, dp_rank: int, dp_world: int):
    from .data.loader import ShardLoader
    from .data.shards import Manifest

    tc, lc = cfg.stage_b.train, cfg.loader
    kw = dict(fields=["z", "tokens", "mask"], verify_checksums=lc.verify_checksums, skip_bad=lc.skip_bad,
              num_workers=lc.num_workers)
    # TP ranks of one group read the same data: the loader is sharded by the DP rank only
    train = ShardLoader(store, "train", tc.batch_size, cfg.run.seed, dp_rank, dp_world, **kw)
    splits = Manifest.load(store).splits
    held = next((s for s in HELDOUT_SPLITS if s in splits), None)
    heldout = ShardLoader(store, held, tc.batch_size, cfg.run.seed, dp_rank, dp_world, **kw) if held else None
    if heldout is None:
        LOG.warning("no held-out split in %s: evaluation is skipped", store)
    return train, heldout


def train(cfg: Config) -> dict:
    """One rank of Stage B training (any launcher)."""
    from .components.logging import MetricsLogger, setup_logging
    from .components.trainer import Trainer
    from .stage_b_task import StageBTask

    info = D.init_distributed()
    stage_dir = cfg.stage_dir("stage_b")
    setup_logging(stage_dir, info["rank"])
    task_info = checked_task_info(cfg, D.world_size())
    mpu = None
    if cfg.stage_b.tp > 1:
        from .distributed.parallel_state import init_parallel

        mpu = init_parallel(cfg.stage_b.tp, seed=cfg.run.seed)
        LOG.info("parallel layout: %s", mpu.describe())
    task = StageBTask(cfg, task_info, mpu)
    dp_rank = mpu.get_data_parallel_rank() if mpu else D.rank()
    dp_world = mpu.get_data_parallel_world_size() if mpu else D.world_size()
    train_loader, heldout = build_loaders(cfg, task_info["store"], dp_rank, dp_world)
    metrics = MetricsLogger(stage_dir, "stage_b", cfg, enabled=D.is_main())
    trainer = Trainer(cfg.stage_b.train, task, train_loader, stage_dir, heldout_loader=heldout, run=cfg.run,
                      stage="stage_b", full_config=cfg.to_dict(), metrics=metrics)
    result = trainer.fit()
    if result.preempted is not None:
        trainer.close()
        raise SystemExit(result.exit_code)  # no completion marker: the requeued job resumes
    out = os.path.join(stage_dir, "export")
    task.export(trainer, out)
    trainer.close()
    summary = {k: result.final_metrics[k] for k in ("loss", "ce", "kd", "mfu") if k in result.final_metrics}
    summary.update(steps=result.step, checkpoint=result.last_checkpoint, export=out,
                   layout=dict(trainer.layout, tp=cfg.stage_b.tp))
    return summary


def main(cfg: Config) -> dict:
    from .components.ray_launch import run_stage

    return run_stage(cfg, train, "stage_b", cfg.stage_b.ray_workers,
                     preflight=lambda world: checked_task_info(cfg, world))


if __name__ == "__main__":
    raise SystemExit(run_entry("stage_b", main))

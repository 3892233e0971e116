"""``python -m coupling_dist.stage_b --config FILE [overrides]``: train the Stage B generator, export it.

Launchers (the same training function ``train(cfg)`` runs on every rank):
- a plain process, ``torchrun``, ``srun``: ranks come from ``components.dist``;
- a Ray job driver (``ray job submit --address ... -- python -m coupling_dist.stage_b --config F``):
  when the process runs under a Ray job (``RAY_JOB_CONFIG_JSON_ENV_VAR`` / ``RAY_JOB_ID`` /
  ``RAY_ADDRESS`` set) with no torch.distributed environment, or when ``stage_b.ray_workers`` is set
  in a single-process launch, the driver checks the inputs, reserves a placement group (one bundle
  per worker: ``ray.num_cpus_per_worker`` CPUs, ``ray.num_gpus_per_worker`` GPUs), starts
  ``stage_b.ray_workers`` (default ``ray.num_workers``) actors that set RANK / WORLD_SIZE /
  MASTER_ADDR / MASTER_PORT and run ``train``, waits, and returns the job's exit status.

Layout: ``stage_b.tp`` ranks per tensor-parallel group (megatron-core), DP = world / tp (DeepSpeed
ZeRO over the DP group, via the mpu adapter). Pre-flight before any training: the pair store
exists and its latent width equals ``stage_a.latent_dim``, the KD teacher exists and shares the
pair store's tokenizer, ``stage_b.tp`` divides the world size (exit status 2, naming the key/path).
Outputs: ``run.dir/stage_b/`` checkpoints (resumed automatically), metrics, and ``export/`` (EMA
generator, safetensors + config.json). Preemption (SIGTERM/SIGUSR1): checkpoint, exit 143/138.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from .cli import PreflightError, run_entry
from .components import dist as D
from .components.logging import get_logger
from .config import Config

LOG = get_logger("stage_b")
HELDOUT_SPLITS = ("heldout", "valid", "validation", "test")
RAY_JOB_VARS = ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID", "RAY_ADDRESS")


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


# --------------------------------------------------------------------------- Ray job driver


def ray_world(cfg: Config) -> Optional[int]:
    """Number of Ray workers when this process should act as a Ray driver, else None."""
    env = os.environ
    if D.launch_env()["launcher"] != "single":
        return None  # torchrun / srun already made the ranks
    under_job = any(env.get(v) for v in RAY_JOB_VARS)
    n = cfg.stage_b.ray_workers or (cfg.ray.num_workers if under_job else None)
    return n if n and (under_job or cfg.stage_b.ray_workers) else None


class _Worker:
    """A Ray actor holding one rank (methods run in the actor process)."""

    def node_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), D.free_port()

    def run(self, cfg: Config, rank: int, world: int, addr: str, port: int, threads: int) -> dict:
        import torch

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=addr, MASTER_PORT=str(port), COUPLING_DIST_LAUNCHER="ray")
        torch.set_num_threads(max(1, threads))
        try:
            return {"rank": rank, "status": 0, "summary": train(cfg)}
        except SystemExit as e:  # preemption: checkpointed, report 143/138
            return {"rank": rank, "status": int(e.code or 0), "summary": None}
        except PreflightError as e:
            return {"rank": rank, "status": 2, "error": str(e), "summary": None}
        finally:
            D.shutdown()


def run_ray(cfg: Config, world: int) -> dict:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    checked_task_info(cfg, world)  # clear errors in the driver, before reserving anything
    if not ray.is_initialized():
        if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    rc = cfg.ray
    bundle = {"CPU": rc.num_cpus_per_worker}
    if rc.num_gpus_per_worker:
        bundle["GPU"] = rc.num_gpus_per_worker
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    ray.get(pg.ready(), timeout=float(os.environ.get("COUPLING_DIST_RAY_PG_TIMEOUT_S", "300")))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for k in ("TORCH_EXTENSIONS_DIR", "COUPLING_DIST_CACHE", "HF_HUB_OFFLINE", "WANDB_MODE", "COUPLING_DIST_TIMEOUT_S",
              "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        if k in os.environ:
            env_vars[k] = os.environ[k]
    Actor = ray.remote(_Worker)
    actors = [Actor.options(num_cpus=rc.num_cpus_per_worker, num_gpus=rc.num_gpus_per_worker,
                            runtime_env={"env_vars": env_vars},
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
              for i in range(world)]
    try:
        addr, port = ray.get(actors[0].node_address.remote())
        LOG.info("Ray: %d workers, master %s:%d", world, addr, port)
        threads = int(rc.num_cpus_per_worker)
        results = ray.get([a.run.remote(cfg, r, world, addr, port, threads) for r, a in enumerate(actors)])
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)
    bad = [r for r in results if r["status"] != 0]
    if bad:
        worst = max(r["status"] for r in bad)
        for r in bad:
            if r.get("error"):
                print(f"error (rank {r['rank']}): {r['error']}", file=sys.stderr)
        raise SystemExit(worst)
    return dict(results[0]["summary"], launcher="ray", ray_workers=world)


def main(cfg: Config) -> dict:
    world = ray_world(cfg)
    if world is not None:
        return run_ray(cfg, world)
    return train(cfg)


if __name__ == "__main__":
    raise SystemExit(run_entry("stage_b", main))

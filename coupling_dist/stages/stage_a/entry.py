"""``python -m coupling_dist.stage_a --config FILE [overrides]``: train Stage A, then export it.

Runs as a single process, under ``torchrun --nproc_per_node N``, under ``srun`` (ranks come from
``components.dist``), and as Ray-actor ranks (``ray job submit -- python -m coupling_dist.stage_a``
or ``stage_a.ray_workers``; see ``components.ray_launch``). Steps: pre-flight (``preflight``),
ShardLoaders for the train and held-out splits, the Stage A task (``task``), the shared Trainer
(resumes from ``run.dir/stage_a/checkpoints/latest`` by default), and finally the frozen artifact
in ``run.dir/stage_a/export`` (``components.training``). Preemption (SIGTERM/SIGUSR1): the Trainer
checkpoints and this process exits with 143/138.
"""
from __future__ import annotations

from ...components import dist as D
from ...components.logging import setup_logging
from ...components.paths import data_dir, stage_a_export, stage_dir
from ...components.training import build_loaders, train_and_export
from ...config import Config
from ...planning.run_plan import check_disk
from .preflight import preflight


def train(cfg: Config) -> dict:
    """One rank of Stage A training (any launcher)."""
    info = D.init_distributed()
    setup_logging(stage_dir(cfg, "stage_a"), info["rank"])
    task = preflight(cfg)
    check_disk(cfg, "stage_a", show=D.is_main())  # checkpoints + export fit the disk (every rank checks its own)
    # no stored features: the token embedding, or the frozen encoder run per batch (online)
    fields = (["features"] if task.feature_dim and not task.online else []) + ["tokens", "mask"]
    fields += ["label"] if task.num_classes else []  # class-conditional: the flow reads each class
    loaders = build_loaders(data_dir(cfg), fields, cfg.stage_a.train.batch_size, cfg,
                            D.rank(), D.world_size())
    summary, _ = train_and_export(cfg, "stage_a", task, loaders, stage_a_export(cfg),
                                  ("loss", "ce", "flow_nll", "bpd"))
    return summary


def main(cfg: Config) -> dict:
    from ...components.ray_launch import run_stage

    return run_stage(cfg, train, "stage_a", cfg.stage_a.ray_workers)

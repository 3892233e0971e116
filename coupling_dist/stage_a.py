"""``python -m coupling_dist.stage_a --config FILE [overrides]``: train Stage A, then export it.

Runs as a single process, under ``torchrun --nproc_per_node N``, under ``srun`` (ranks come from
``components.dist``), and as Ray-actor ranks (``ray job submit -- python -m coupling_dist.stage_a``
or ``stage_a.ray_workers``; see ``components.ray_launch``). Steps: pre-flight (the preprocessed
shard set exists, holds encoder features of the width this config's encoder produces, and was
tokenized with ``data.tokenizer``; any mismatch exits with status 2 before training), ShardLoaders
for the train and held-out splits, the Stage A task, the shared Trainer (resumes from
``run.dir/stage_a/checkpoints/latest`` by default), and finally the frozen artifact in ``run.dir/stage_a/export``.
Preemption (SIGTERM/SIGUSR1): the Trainer checkpoints and this process exits with 143/138.
"""
from __future__ import annotations

import os

from .cli import PreflightError, run_entry
from .components import dist as D
from .components.logging import MetricsLogger, get_logger, setup_logging
from .components.trainer import Trainer
from .config import Config

LOG = get_logger("stage_a")
HELDOUT_SPLITS = ("heldout", "valid", "validation", "test")


def _manifest_dict(data_dir: str) -> dict:
    from .data.shards import Manifest

    man = Manifest.load(data_dir)
    return man if isinstance(man, dict) else man.to_dict()


def preflight(cfg: Config):
    """Build the task, refusing shards that do not fit this config (clear errors, exit 2)."""
    from .stage_a_task import DataMismatchError, StageATask

    data_dir = cfg.data_dir
    manifest = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(manifest):
        raise PreflightError(f"{manifest} not found: run `python -m coupling_dist.preprocess` first "
                             f"(or set data.out_dir to an existing shard set)")
    try:
        task = StageATask.from_data(cfg, data_dir)
    except (DataMismatchError, KeyError, ValueError) as e:
        raise PreflightError(str(e)) from None
    enc = (_manifest_dict(data_dir).get("encoder") or {})
    if cfg.encoder.model is not None and not cfg.stage_a.online_encoder:
        from . import assets

        want = assets.identity(cfg.encoder.model)
        if enc.get("hash") and want["hash"] and enc["hash"] != want["hash"]:
            raise PreflightError(f"{manifest}: features were made by encoder {enc.get('name')!r} (hash {enc['hash']}) "
                                 f"but encoder.model is {cfg.encoder.model!r} (hash {want['hash']}); rerun preprocess")
        hidden = _encoder_width(cfg.encoder.model)
        if hidden is not None and hidden != task.feature_dim:
            raise PreflightError(f"{manifest}: field 'features' has width {task.feature_dim} but encoder "
                                 f"{cfg.encoder.model!r} has hidden size {hidden}; rerun preprocess")
    return task


def _encoder_width(ref: str):
    from . import assets

    try:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(assets.resolve(ref), local_files_only=True)
    except (OSError, ValueError):  # no loadable config (e.g. hub id offline): the manifest check stands
        return None
    return getattr(conf, "hidden_size", None)


def build_loaders(cfg: Config):
    from .data.loader import ShardLoader

    tc, lc = cfg.stage_a.train, cfg.loader
    kw = dict(fields=["features", "tokens", "mask"], verify_checksums=lc.verify_checksums, skip_bad=lc.skip_bad,
              num_workers=lc.num_workers)
    train = ShardLoader(cfg.data_dir, "train", tc.batch_size, cfg.run.seed, D.rank(), D.world_size(), **kw)
    splits = _manifest_dict(cfg.data_dir).get("splits") or {}
    held_split = next((s for s in HELDOUT_SPLITS if s in splits), None)
    heldout = None
    if held_split is not None:
        heldout = ShardLoader(cfg.data_dir, held_split, tc.batch_size, cfg.run.seed, D.rank(), D.world_size(), **kw)
    else:
        LOG.warning("no held-out split in %s: evaluation is skipped", cfg.data_dir)
    return train, heldout


def train(cfg: Config) -> dict:
    """One rank of Stage A training (any launcher)."""
    info = D.init_distributed()
    stage_dir = cfg.stage_dir("stage_a")
    setup_logging(stage_dir, info["rank"])
    task = preflight(cfg)
    train, heldout = build_loaders(cfg)
    metrics = MetricsLogger(stage_dir, "stage_a", cfg, enabled=D.is_main())
    trainer = Trainer(cfg.stage_a.train, task, train, stage_dir, heldout_loader=heldout, run=cfg.run,
                      stage="stage_a", full_config=cfg.to_dict(), metrics=metrics)
    result = trainer.fit()
    if result.preempted is not None:
        trainer.close()
        raise SystemExit(result.exit_code)  # no completion marker: the requeued job resumes
    out = os.path.join(stage_dir, "export")
    task.export(trainer, out)  # collective under ZeRO-3
    D.barrier()
    trainer.close()
    summary = {k: result.final_metrics[k] for k in ("loss", "ce", "flow_nll", "bpd") if k in result.final_metrics}
    summary.update(steps=result.step, checkpoint=result.last_checkpoint, export=out)
    return summary


def main(cfg: Config) -> dict:
    from .components.ray_launch import run_stage

    return run_stage(cfg, train, "stage_a", cfg.stage_a.ray_workers)


if __name__ == "__main__":
    raise SystemExit(run_entry("stage_a", main))

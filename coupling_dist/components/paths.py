"""Where things live: the one place that knows each default output path and the cache directory.

Every stage writes under ``run.dir/<stage>/`` (evaluation under ``run.dir/eval``); the stage
that produces an output and the stages that consume it both ask here, so a default is written
down once. Optional config keys override the inputs a stage reads (``data.out_dir``,
``pair_store.artifact``, ``sample.export``, ``sample.out``, ``classifier.out``, ``sample.classifier.path``,
``finetune.export``, ``finetune.reward``).
"""
from __future__ import annotations

import os

COMPLETE = "_COMPLETE.json"  # a stage's completion marker, written after every rank finished
_DIRS = {"evaluate": "eval"}  # evaluate writes to run.dir/eval (the documented results location)


def stage_dir(cfg, stage: str) -> str:
    return os.path.join(cfg.run.dir, _DIRS.get(stage, stage))


def completion_marker(cfg, stage: str) -> str:
    return os.path.join(stage_dir(cfg, stage), COMPLETE)


def data_dir(cfg) -> str:
    """The preprocessed shard set (written by preprocess, read by stage_a / pair_store / evaluate)."""
    return cfg.data.out_dir or stage_dir(cfg, "data")


def stage_a_export(cfg) -> str:
    """Where Stage A writes its frozen artifact."""
    return os.path.join(stage_dir(cfg, "stage_a"), "export")


def stage_a_artifact(cfg) -> str:
    """The Stage A artifact the pair store reads."""
    return cfg.pair_store.artifact or stage_a_export(cfg)


def pair_store_dir(cfg) -> str:
    return stage_dir(cfg, "pair_store")


def generator_export(cfg) -> str:
    """Where Stage B writes its EMA generator."""
    return os.path.join(stage_dir(cfg, "stage_b"), "export")


def finetune_source(cfg) -> str:
    """The generator export reward fine-tuning starts from (theta_0)."""
    return cfg.finetune.export or generator_export(cfg)


def finetune_export(cfg) -> str:
    """Where reward fine-tuning writes its generator (the generator export format)."""
    return os.path.join(stage_dir(cfg, "finetune"), "export")


def sampling_export(cfg, kind: str = None) -> str:
    """The export that sample / evaluate read: the generator, or with ``sample.kind`` (or ``kind``)
    "stage_a" the Stage A export (the Stage-A-only sampler)."""
    kind = kind or cfg.sample.kind
    explicit = cfg.sample.export if kind == cfg.sample.kind else None  # sample.export names sample.kind's export
    return explicit or (stage_a_export(cfg) if kind == "stage_a" else generator_export(cfg))


def reward_classifier(cfg) -> str:
    """Where ``python -m coupling_dist.classifier`` writes the reward classifier (``classifier.out``)."""
    return cfg.classifier.out or os.path.join(stage_dir(cfg, "classifier"), "export")


def finetune_reward(cfg) -> str:
    """The reward classifier reward fine-tuning reads (``finetune.reward``, default ``classifier.out``)."""
    return cfg.finetune.reward or reward_classifier(cfg)


def guidance_classifier(cfg) -> str:
    """The reward classifier that latent classifier guidance reads (``sample.classifier.path``)."""
    return cfg.sample.classifier.path or reward_classifier(cfg)


def samples_file(cfg) -> str:
    """What sample writes and evaluate scores by default."""
    return cfg.sample.out or os.path.join(stage_dir(cfg, "sample"), "samples.jsonl")


def eval_results(cfg) -> str:
    return os.path.join(stage_dir(cfg, "evaluate"), "results.json")


def cache_dir() -> str:
    """Built assets and measured peaks (``$COUPLING_DIST_CACHE``, default ``~/.cache/coupling_dist``)."""
    return os.environ.get("COUPLING_DIST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "coupling_dist")


def read_completion(cfg, stage: str):
    """The stage's completion record (``_COMPLETE.json``), or None when the stage is not complete."""
    import json

    path = completion_marker(cfg, stage)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)

"""Stage A as a Trainer task (see ``components/trainer.py`` for the protocol).

``StageATask.from_data(cfg, data_dir)`` is what the pre-flight uses: it reads the preprocessed shard set's
manifest, checks that its encoder features fit the config (clear errors naming the manifest and
field before any training; shards without features -- ``encoder.model: null`` -- give the
token-embedding encoder, ``models/stage_a.py``), estimates the feature normalisation statistics from the
first training batches, and records what the export needs (seq_len, tokenizer and encoder
identity, and the compact vocabulary's ids under ``data.vocab: corpus``: the decoder head then
covers those ids only, and targets are mapped to them, ``data/vocab.py``). Everything the Trainer calls is below.

Class-conditional runs (``data.num_classes`` > 0): the flow reads each sample's class (the shard
field ``label``), replaced by the null class with probability ``stage_a.cond_dropout`` (drawn from
the rank's global RNG, like the dequantisation noise: the Trainer checkpoints its state, so a resumed
run draws the same), and the export records ``num_classes``.

``stage_a.online_encoder``: the shards hold tokens only and every rank runs the frozen encoder
(``models/frozen_encoder.OnlineFeatures``) on its batch inside the step, before the Stage A model,
in the training precision and without gradients; the encoder is an attribute of the task, not of
the model, so DeepSpeed never sees it (no optimizer state, no checkpoint, no ZeRO partitioning).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
from torch import nn

from ...components import dist as D
from ...components.trainer import training_dtype
from ...config import Config
from ...data.source import describe_source
from ...data.vocab import CompactVocab, vocab_for
from ...domains import build_domain
from ...distributed.parallelize import ParallelDims, parallelize
from ...models.conditioning import batch_labels, drop_labels
from ...models.frozen_encoder import OnlineFeatures
from ...models.stage_a import StageAModel
from ...models.stage_a_export import export_stage_a

STATS_BATCHES = 8  # training batches used to estimate the feature mean/std


def build_online_features(cfg: Config, device) -> OnlineFeatures:
    """The frozen encoder (``encoder.model``/``layer``, features rounded to ``encoder.dtype`` as the
    shards would hold them) on ``device``, computing in Stage A's training precision."""
    e = cfg.encoder
    return OnlineFeatures(e.model, e.layer, e.dtype, device, training_dtype(cfg.stage_a.train.precision, device))


class StageATask:
    def __init__(self, cfg: Config, feature_dim: int, vocab_size: int, *, seq_len: int,
                 meta: Optional[dict] = None, stats_batches: Optional[Iterable] = None,
                 feature_stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 vocab: Optional[CompactVocab] = None, online: bool = False):
        self.cfg = cfg
        self.online = online  # stage_a.online_encoder: features computed per batch (``features``)
        self.encoder: Optional[OnlineFeatures] = None  # built on the rank's device by build_model
        self.vocab = vocab  # None: the head spans the tokenizer's vocabulary
        self.num_classes = int(cfg.data.num_classes)
        self.feature_dim, self.vocab_size, self.seq_len = int(feature_dim), int(vocab_size), int(seq_len)
        self.meta = dict(meta or {})
        self._stats_batches = stats_batches
        self._stats = feature_stats
        self.model: Optional[StageAModel] = None

    # ------------------------------------------------------------------ construction from shards

    @classmethod
    def from_data(cls, cfg: Config, data_dir: str) -> "StageATask":
        from ...data.loader import ShardLoader
        from ...data.shards import Manifest

        man = Manifest.load(data_dir)
        info = describe_source(man, data_dir)
        build_domain(cfg).check_tokenizer(info, data_dir)
        bs = min(cfg.stage_a.train.batch_size, 64)

        online = bool(info["online_features"])

        def stats_batches():
            # Same batches on every rank (a world-1 view), so all ranks get identical statistics.
            # (batch, mask): the features come from ``features(batch)`` (stored or computed online)
            loader = ShardLoader(data_dir, "train", bs, cfg.run.seed, 0, 1,
                                 fields=["tokens" if online else "features", "mask"])
            for i, b in enumerate(loader):
                if i >= STATS_BATCHES:
                    break
                # statistics over the positions Stage A encodes (all of them, pads included, unless
                # the "passthrough" ablation is on)
                yield b, (b["mask"] if cfg.stage_a.pad_positions == "passthrough" else torch.ones_like(b["mask"]))

        vocab = vocab_for(cfg, data_dir)
        meta = {"seq_len": info["seq_len"], "tokenizer": info["tokenizer"], "encoder": info["encoder"],
                "feature_dtype": info["feature_dtype"], "source_data": os.path.abspath(data_dir),
                "vocab": vocab.to_meta() if vocab else None, "num_classes": int(cfg.data.num_classes)}
        feature_dim = info["feature_dim"] or 0  # 0: no stored features, Stage A learns a token embedding
        return cls(cfg, feature_dim, vocab.size if vocab else info["vocab_size"], seq_len=info["seq_len"],
                   meta=meta, stats_batches=stats_batches() if feature_dim else None, vocab=vocab,
                   online=online and feature_dim > 0)

    # ------------------------------------------------------------------ Trainer protocol

    def build_model(self) -> nn.Module:
        model = StageAModel(self.feature_dim, self.vocab_size, self.cfg.stage_a, self.num_classes)
        if self.online and self.encoder is None:
            self.encoder = build_online_features(self.cfg, D.device())
        if self._stats is None and self._stats_batches is not None:
            batches = ((self.features(b).cpu(), m) for b, m in self._stats_batches)
            self._stats = StageAModel.estimate_feature_stats(batches)
        if self._stats is not None:
            model.set_feature_stats(*self._stats)
        # no tensor parallelism for Stage A: the shared layout function applies activation checkpointing
        self.model = parallelize(model, ParallelDims(),
                                 activation_checkpointing=self.cfg.stage_a.train.activation_checkpointing)
        return self.model

    def targets(self, batch: dict) -> torch.Tensor:
        """The batch's tokens as head rows (compact ids under ``data.vocab: corpus``)."""
        return batch["tokens"] if self.vocab is None else self.vocab.to_compact(batch["tokens"])

    def features(self, batch: dict) -> torch.Tensor:
        """The batch's frozen-encoder features: stored in the shards, or computed from its tokens by
        the frozen encoder on this rank (``stage_a.online_encoder``; the same values)."""
        return self.encoder(batch["tokens"]) if self.online else batch["features"]

    def source(self, batch: dict) -> torch.Tensor:
        """The encoder's input: the features, or the head-row ids for the token embedding."""
        return self.features(batch) if self.feature_dim else self.targets(batch)

    def labels(self, batch: dict, train: bool):
        """The batch's classes (None for an unconditional run); in training each is the null class
        (-1) with probability stage_a.cond_dropout."""
        if not self.num_classes:
            return None
        labels = batch_labels(batch)
        return drop_labels(labels, self.cfg.stage_a.cond_dropout) if train else labels

    def loss(self, model: StageAModel, batch: dict, step: int):
        kw = {"labels": self.labels(batch, True)} if self.num_classes else {}
        return model.loss(self.source(batch), self.targets(batch), batch["mask"], step, **kw)

    @torch.no_grad()
    def eval_metrics(self, model: StageAModel, batch: dict) -> dict:
        # Evaluated at the end-of-anneal weight so eval losses are comparable across steps.
        _, m = model.loss(self.source(batch), self.targets(batch), batch["mask"], step=self.cfg.stage_a.train.steps,
                          labels=self.labels(batch, False))
        return {k: v for k, v in m.items() if k != "lambda_flow"}

    def flops_per_sample(self) -> dict:
        model = self.model or StageAModel(self.feature_dim, self.vocab_size, self.cfg.stage_a, self.num_classes)
        out = {"stage_a": model.flops_per_sample(self.seq_len)}
        if self.encoder is not None:  # the frozen encoder's forward is part of every step
            out["encoder"] = self.encoder.flops_per_sample(self.seq_len)
        return out

    def tokens_in_batch(self, batch: dict) -> int:
        return int(batch["mask"].sum().item())

    def export(self, trainer, out_dir: str) -> None:
        """Collective (ZeRO-3 gathers): every rank calls it; DP rank 0 writes. With
        ``stage_a.train.ema_decay`` the EMA weights are exported (as Stage B does), else the live ones."""
        ema = trainer.ema is not None
        sd = trainer.ema_state_dict() if ema else trainer.full_state_dict(include_buffers=True)
        if sd is not None:
            meta = dict(self.meta, train_step=int(getattr(trainer, "step", 0)), weights="ema" if ema else "live")
            export_stage_a(self.model, out_dir, meta, state_dict=sd)

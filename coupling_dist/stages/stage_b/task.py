"""Stage B as a Trainer task (protocol: ``components/trainer.py``).

``StageBTask(cfg, info, dims)`` takes what the pre-flight checked (``preflight.checked_task_info``)
and the parallel layout (``distributed.parallelize.build_parallel_dims``). The task then:

- builds the plain generator (``models/generator.py``; for ``stage_b.model.kind: composite`` the
  composite D(NF^-1(z)) initialised from the Stage A export the pair store was made from,
  ``models/composite_generator.py``) and applies the parallel layout with
  ``distributed.parallelize.parallelize`` (megatron-core TP layers when ``stage_b.tp > 1``,
  activation checkpointing when ``stage_b.train.activation_checkpointing``); ``mpu`` hands the
  TP x DP groups to DeepSpeed and the Trainer;
- per training batch: picks one of the K stored latents per sample, replaces latents with
  probability ``latent_mix_prob`` by N(0, I) * ``latent_mix_scale`` (``latent_mix_unit``: the whole
  update, as the paper does, or each sample), and for the masked denoiser draws the mask time
  t ~ U(0, 1) and masks every position, pads included, with probability t (Algorithm 2). The
  loss covers all T positions (Eq. 2 / Eq. 32, see ``inputs``). These draws come from a
  generator seeded by (run.seed, step, data-parallel rank), not from the global RNG: every TP rank
  of a group must see the same inputs, and a resumed run replays them exactly;
- class-conditional runs (``data.num_classes`` > 0): the pair store's ``label`` is the generator's
  class, replaced by the null class (-1) with probability ``stage_b.cond_dropout`` -- drawn from its
  own (seed, step, dp rank) generator (salt 3), so the other draws are those of an unconditional
  run and a resumed run replays them exactly; evaluation batches keep every label;
- loss = CE + lambda_KD * KD from ``losses.kd_loss`` (chunked, vocab-parallel under TP); the frozen
  teacher (a HF causal LM, not part of the trained module, so neither DeepSpeed nor the EMA sees
  it) runs its trunk on the ground-truth tokens and only its head *shard* enters the loss; with
  ``stage_b.kd.source: cache`` the teacher is never loaded and its top-k cache from the pair store
  (``pair_store.teacher_topk``) enters the loss instead;
- under ``data.vocab: corpus`` the head rows are the pair store's compact ids (``data/vocab.py``):
  CE targets and x_t are mapped to them, the teacher still reads tokenizer ids, and its head is
  restricted to the compact ids (KD against the renormalised restricted teacher: an
  approximation of the full-vocabulary KD, see ``losses/kd_loss.py``);
- exports the EMA generator (full TP = 1 weights via ``gather_full_state_dict``) for sampling,
  with the compact ids so samplers map back to tokenizer ids.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ...components import dist as D
from ...components.assets import load_causal_lm
from ...components import faults
from ...config import Config
from ...distributed.parallelize import ParallelDims, parallelize
from ...losses.kd_loss import sequence_loss
from ...models.composite_generator import composite_arch
from ...models.conditioning import batch_labels, drop_labels
from ...models.generator import build_generator, export_generator
from ...models.teacher import CACHE_FIELDS, teacher_dtype, teacher_flops_per_token, trunk_hidden


class StageBTask:
    def __init__(self, cfg: Config, info: dict, dims: Optional[ParallelDims] = None):
        self.cfg, self.info = cfg, info
        self.dims = dims or ParallelDims()
        self.mpu = self.dims.mpu  # the model-parallel groups DeepSpeed and the Trainer read
        self.model: Optional[nn.Module] = None
        self._teacher: Optional[nn.Module] = None
        self.vocab = info.get("vocab")  # CompactVocab, or None: the head spans the tokenizer vocabulary
        self._teacher_rows: Optional[torch.Tensor] = None  # the teacher head in this student's row order
        self.num_classes = int(info.get("num_classes", 0))  # > 0: G(z, y) (data.num_classes)

    # ------------------------------------------------------------------ model

    def arch(self):
        """What ``build_generator`` builds: ``stage_b.model``, or for the composite the Stage A config."""
        if self.info.get("stage_a") is None:
            return self.cfg.stage_b.model
        from ...models.stage_a_export import read_meta

        return composite_arch(read_meta(self.info["stage_a"])["stage_a"])

    def build_model(self) -> nn.Module:
        i = self.info
        model = build_generator(self.arch(), i["latent_dim"], i["seq_len"], i["vocab_size"], i["mask_token_id"],
                                i.get("patch", 1), self.num_classes)
        if i.get("stage_a") is not None:  # warm start: G = D(NF^-1(z)) exactly, before any update
            from safetensors.torch import load_file

            model.load_stage_a(load_file(os.path.join(i["stage_a"], "model.safetensors")))
        self.model = parallelize(model, self.dims,
                                 activation_checkpointing=self.cfg.stage_b.train.activation_checkpointing)
        return self.model

    def tp_partition_dims(self) -> dict:
        """Which parameters the TP layers split, along which dim (any TP size, 1 included): the
        Trainer saves it with each checkpoint so a run resumes at another ``stage_b.tp``."""
        from ...distributed.tensor_parallel import partition_dims

        return partition_dims(self.model)

    def teacher_head(self, teacher: nn.Module) -> torch.Tensor:
        """The teacher's output rows aligned with the student's head rows (all V of them): the
        compact ids' rows, zero-padded, under ``data.vocab: corpus`` (gathered once: frozen)."""
        weight = teacher.get_output_embeddings().weight
        if self.vocab is None:
            return weight
        if self._teacher_rows is None:
            self._teacher_rows = self.vocab.restrict(weight, rows=self.info["vocab_size"])
        return self._teacher_rows

    def teacher(self, device: torch.device) -> Optional[nn.Module]:
        """The live teacher; None without KD or with ``stage_b.kd.source: cache`` (never loaded then)."""
        if self.info["teacher"] is None or self.cached_kd:
            return None
        if self._teacher is None:
            self._teacher = load_causal_lm(self.info["teacher"]["path"], device, teacher_dtype(device))
        return self._teacher

    @property
    def cached_kd(self) -> bool:
        return self.info["teacher"] is not None and self.info["teacher"].get("source") == "cache"

    def fields(self) -> list[str]:
        """The pair-store fields a batch needs."""
        return (["z", "tokens", "mask"] + (list(CACHE_FIELDS) if self.cached_kd else [])
                + (["label"] if self.num_classes else []))

    # ------------------------------------------------------------------ batches

    def _generator(self, step: int, salt: int, per_rank: bool = True) -> torch.Generator:
        dp = self.dims.dp_rank if per_rank else 0
        seed = (self.cfg.run.seed * 1_000_003 + step * 7919 + dp * 104_729 + salt) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def inputs(self, batch: dict, step: int, train: bool):
        """(z [B, T, d] fp32, tokens [B, T] long, mask [B, T] bool, x_t or None, ce_weight [B, T]).

        Every position 1..T is a target (Eq. 2: pads after the first EOS included, weighted by
        ``stage_b.pad_weight``). ``ce_weight`` sums to 1 over the batch: a token mean for the
        one-step generator; for the masked denoiser Eq. 32's per-sequence normalisation
        (1 / sum_i m_i over a row's masked positions, then the mean over rows)."""
        z_all = batch["z"]
        if z_all.dim() == 3:  # a store without the multiplicity axis
            z_all = z_all[:, None]
        B, K = z_all.shape[:2]
        dev = z_all.device
        g = self._generator(step, 0 if train else 1)
        k = torch.randint(0, K, (B,), generator=g) if (train and K > 1) else torch.zeros(B, dtype=torch.long)
        z = z_all[torch.arange(B), k.to(dev)].float()
        tokens, mask = batch["tokens"].long(), batch["mask"].bool()
        if self.vocab is not None:  # the head's row ids (the teacher reads batch["tokens"] itself)
            tokens = self.vocab.to_compact(tokens)
        sb = self.cfg.stage_b
        if train and sb.latent_mix_prob > 0:
            if sb.latent_mix_unit == "update":  # one draw per update, the same on every rank
                mix = (torch.rand(1, generator=self._generator(step, 2, per_rank=False)) < sb.latent_mix_prob).expand(B)
            else:
                mix = torch.rand(B, generator=g) < sb.latent_mix_prob
            noise = torch.randn(z.shape, generator=g) * sb.latent_mix_scale
            z = torch.where(mix.to(dev)[:, None, None], noise.to(dev, z.dtype), z)
        x_t = None
        if self.info["mask_token_id"] is not None:
            masked = mdm_mask(B, tokens.shape[1], g).to(dev)
            x_t = torch.where(masked, torch.full_like(tokens, self.info["mask_token_id"]), tokens)
            ce_weight = masked.float() / masked.sum(1, keepdim=True).float() / B
        else:
            w = torch.where(mask, torch.ones((), device=dev), torch.full((), float(sb.pad_weight), device=dev))
            ce_weight = w / w.sum().clamp_min(1e-12)
        return z, tokens, mask, x_t, ce_weight

    def labels(self, batch: dict, step: int, train: bool) -> Optional[torch.Tensor]:
        """The batch's classes [B] (None for an unconditional run); in training each is the null
        class (-1) with probability ``stage_b.cond_dropout``, a function of (seed, step, dp rank)."""
        if not self.num_classes:
            return None
        labels = batch_labels(batch)
        if not train:
            return labels
        return drop_labels(labels, self.cfg.stage_b.cond_dropout, self._generator(step, 3))

    # ------------------------------------------------------------------ Trainer protocol

    def _loss(self, model, batch: dict, step: int, train: bool):
        from ...distributed.tensor_parallel import head_shard, tp_info

        z, tokens, mask, x_t, ce_weight = self.inputs(batch, step, train)
        labels = self.labels(batch, step, train)
        h = model.hidden(z, x_t) if labels is None else model.hidden(z, x_t, labels)
        w, start, V = head_shard(model)
        kd = self.cfg.stage_b.kd
        teacher = self.teacher(h.device)
        th = wt = cached = None
        if teacher is not None:
            with torch.no_grad():
                # the teacher reads tokenizer ids (``tokens`` may be compact head rows)
                th = trunk_hidden(teacher, batch["tokens"].long().to(h.device), mask).to(h.dtype)
                wt = self.teacher_head(teacher)[start:start + w.shape[0]].to(h.dtype)
        elif self.cached_kd:  # the teacher's top-k from the pair store (global ids: the loss shards them)
            cached = tuple(batch[f].to(h.device) for f in CACHE_FIELDS)
        has_kd = teacher is not None or cached is not None
        size, _, group = tp_info(model)
        # KD where the causal teacher is defined: real tokens and the first EOS (masked denoiser:
        # only the masked ones among them, the positions the denoiser predicts).
        kd_mask = mask if x_t is None else mask & (ce_weight > 0)
        total, ce, kdv = sequence_loss(h, tokens, ce_weight, w, teacher_hidden=th, teacher_weight=wt,
                                       teacher_topk=cached, kd_mask=kd_mask if has_kd else None,
                                       temperature=kd.temperature, label_smoothing=self.cfg.stage_b.label_smoothing,
                                       lambda_kd=kd.weight if has_kd else 0.0, vocab_start=start,
                                       vocab_size=V, tp_group=group if size > 1 else None,
                                       chunk_rows=kd.chunk_positions, chunk_vocab=kd.chunk_vocab,
                                       # compact head: no teacher mass on padding rows or the mask token
                                       teacher_vocab=None if self.vocab is None else self.vocab.size)
        return total, {"ce": ce, "kd": kdv}

    def loss(self, model, batch: dict, step: int):
        faults.point("stage_b.step", step=step, rank=D.rank())  # tests: a real crash mid-step
        return self._loss(model, batch, step, train=True)

    @torch.no_grad()
    def eval_metrics(self, model, batch: dict) -> dict:
        total, parts = self._loss(model, batch, 0, train=False)
        return {"loss": total, **parts}

    def tokens_in_batch(self, batch: dict) -> int:
        return int(batch["mask"].sum().item())

    def flops_per_sample(self) -> dict:
        i = self.info
        gen = self.model or build_generator(self.arch(), i["latent_dim"], i["seq_len"], i["vocab_size"],
                                            i["mask_token_id"], i.get("patch", 1), self.num_classes)
        out = {"student": gen.flops_per_sample(i["seq_len"])}
        if i["teacher"] is not None and not self.cached_kd:  # a cached teacher costs no FLOPs here
            out["teacher"] = teacher_flops_per_token(self.teacher(D.device()), i["seq_len"], i["vocab_size"]) * i["seq_len"]
        return out

    def export_meta(self) -> dict:
        i = self.info
        patch = {"patch": i["patch"]} if i.get("patch", 1) > 1 else {}  # tokens per latent position
        return {**patch, "latent_dim": i["latent_dim"], "seq_len": i["seq_len"], "vocab_size": i["vocab_size"],
                "kind": self.cfg.stage_b.model.kind, "mask_token_id": i["mask_token_id"], "eos_id": i["eos_id"],
                "pad_id": i["pad_id"], "tokenizer": i["tokenizer"], "tokenizer_vocab_size": i["tok_vocab"],
                "teacher": (i["teacher"] or {}).get("identity"), "pair_store": os.path.abspath(i["store"]),
                "vocab": self.vocab.to_meta() if self.vocab is not None else None, "num_classes": self.num_classes,
                "cond_dropout": self.cfg.stage_b.cond_dropout if self.num_classes else 0.0}

    def export(self, trainer, out_dir: str) -> Optional[str]:
        """Collective: every rank calls it. The EMA weights (or the live ones without EMA) are
        gathered over DP (Trainer) and TP (here); global rank 0 writes the TP = 1 export."""
        from ...distributed.tensor_parallel import gather_full_state_dict

        sd = trainer.ema_state_dict() if trainer.ema is not None else trainer.full_state_dict()
        full = gather_full_state_dict(self.model, sd) if sd is not None else None
        path = None
        if D.is_main():
            meta = dict(self.export_meta(), train_step=int(trainer.step), weights="ema" if trainer.ema else "live")
            path = export_generator(full, self.arch(), meta, out_dir)
        D.barrier()
        return path


def mdm_mask(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Algorithm 2 lines 5-7: t ~ U(0, 1) per row, m_i ~ Bernoulli(t) at every position (pads
    included: P2-self starts from an all-mask sequence), a row with no masked position redrawn
    (same t) until it has one. [B, T] bool, a function of the generator's state."""
    t = torch.rand(B, 1, generator=g)
    m = torch.rand(B, T, generator=g) < t
    while True:
        empty = (~m.any(1)).nonzero().flatten()
        if not empty.numel():
            return m
        m[empty] = torch.rand(empty.numel(), T, generator=g) < t[empty]

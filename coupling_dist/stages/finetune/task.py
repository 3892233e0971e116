"""Reward fine-tuning (Algorithm 6) as a Trainer task (protocol: ``components/trainer.py``).

``FinetuneTask(cfg, info, dims)`` takes what the pre-flight checked (``preflight.checked_task_info``)
and the parallel layout. Per step, on this rank's slice of the (z, y) batch (``latents.LatentLoader``):

    logits   = G_theta(z, y)                      the trained generator (full head rows; under TP
                                                  the vocabulary shards are gathered, differentiably)
    x~       = rho(logits / tau)                  ``guidance.relax``: softmax, gumbel, straight_through
    R        = log p(y | x~)                      ``guidance.reward``: the frozen reward classifier
    anchor   = MSE(logits, G_theta0(z, y))        finetune.anchor = logit, or
             = KL(p_theta0 || p_theta)            finetune.anchor = kl (per position, mean)
    loss     = -lambda_reward * mean(R) + lambda_anchor * anchor

theta_0 (the source export) and the reward classifier are frozen modules held by the task, not by
the trained module: DeepSpeed, the EMA and the checkpoints never see them. A resumed run reloads
theta_0 from the export, and refuses a checkpoint that records another export or reward
(``checkpoint_meta`` / ``check_resume``). Relaxation noise (gumbel) comes from a generator seeded
by (run.seed, step, data-parallel rank): the TP ranks of a group draw the same noise and a resumed
run replays it. Head rows that are no token (a padded head, the mask token, rows past a compact
vocabulary) get no relaxed mass, as the samplers never emit them.

Logged per step: ``reward`` (mean R on the relaxed output), ``anchor``, ``reward_hard`` and
``accuracy`` (R and the reward classifier's class accuracy on the hard argmax samples).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...components import dist as D
from ...components import faults
from ...components.preflight import PreflightError
from ...config import Config
from ...distributed.parallelize import ParallelDims, parallelize
from .latents import LatentLoader, batch_seed

NOISE_SALT, HELDOUT_SALT = 3, 1


class FinetuneTask:
    def __init__(self, cfg: Config, info: dict, dims: Optional[ParallelDims] = None):
        self.cfg, self.info, self.ft = cfg, info, cfg.finetune
        self.dims = dims or ParallelDims()
        self.mpu = self.dims.mpu
        self.model: Optional[nn.Module] = None
        self._anchor: Optional[nn.Module] = None
        self._reward = None
        self._banned: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ inputs

    def loaders(self) -> tuple:
        """(train, held-out) (z, y) sources; the held-out one repeats the same batches every evaluation."""
        i, ft = self.info, self.ft
        kw = dict(global_batch=ft.train.batch_size, positions=i["positions"], latent_dim=i["latent_dim"],
                  num_classes=i["num_classes"], labels=ft.labels, latent_scale=ft.latent_scale,
                  seed=self.cfg.run.seed, dp_rank=self.dims.dp_rank, dp_world=self.dims.dp_world)
        return LatentLoader(**kw), LatentLoader(**kw, salt=HELDOUT_SALT)

    # ------------------------------------------------------------------ models

    def _load_source(self, device="cpu") -> nn.Module:
        from ...models.generator import load_generator

        model, _ = load_generator(self.info["export"], device=device)
        return model

    def build_model(self) -> nn.Module:
        model = self._load_source().train()  # theta <- theta_0
        self.model = parallelize(model, self.dims, activation_checkpointing=self.ft.train.activation_checkpointing)
        return self.model

    def anchor_model(self, device: torch.device) -> nn.Module:
        """The frozen theta_0 (a TP = 1 copy on every rank: it computes the full-row logits)."""
        if self._anchor is None:
            self._anchor = self._load_source(device).requires_grad_(False).eval()
        return self._anchor

    def reward(self, device: torch.device):
        if self._reward is None:
            from ...domains import build_domain
            from ...guidance.reward import load_reward

            self._reward = load_reward(self.info["reward"], build_domain(self.cfg), self.info["meta"], device=device)
        return self._reward

    def banned(self, device: torch.device) -> torch.Tensor:
        """Head rows that are no token: excluded from the relaxation and the hard samples."""
        if self._banned is None:
            from ...data.vocab import CompactVocab
            from ...sampling.onestep import banned_ids

            meta = self.info["meta"]
            vocab = CompactVocab.from_meta(meta.get("vocab"))
            limit = vocab.size if vocab is not None else (meta.get("tokenizer_vocab_size")
                                                          or (meta.get("tokenizer") or {}).get("vocab_size"))
            self._banned = banned_ids(meta, None if limit is None else int(limit), device)
        return self._banned

    def tp_partition_dims(self) -> dict:
        from ...distributed.tensor_parallel import partition_dims

        return partition_dims(self.model)

    # ------------------------------------------------------------------ the objective

    def logits(self, model: nn.Module, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G_theta(z, y): all head rows [B, T, V] in fp32 (under TP the shards are gathered; the
        gather's backward hands each rank the gradient of its own shard)."""
        from ...distributed.tensor_parallel import head_shard, tp_info

        h = model.hidden(z, None, labels)
        w = head_shard(model)[0]
        local = F.linear(h, w.to(h.dtype))
        size, _, group = tp_info(model)
        if size > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            local = gather_from_tensor_model_parallel_region(local, group=group)
        return local.float()

    def anchor_distance(self, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if self.ft.anchor == "logit":
            return F.mse_loss(logits, ref)
        # KL(p_theta0 || p_theta) per position, averaged over the batch's positions
        logp, logq = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()

    def _objective(self, model, batch: dict, step: int, noise: Optional[torch.Generator]):
        from ...guidance.relax import relax

        z, labels = batch["z"].float(), batch["labels"].long()
        logits = self.logits(model, z, labels)
        with torch.no_grad():
            ref = self.anchor_model(logits.device)(z, labels=labels).float()
        banned = self.banned(logits.device)
        masked = logits.index_fill(-1, banned, float("-inf")) if banned.numel() else logits
        reward = self.reward(logits.device)
        r = reward(relax(masked, self.ft.relaxation, self.ft.tau, generator=noise), labels)
        anchor = self.anchor_distance(logits, ref)
        loss = -self.ft.lambda_reward * r.mean() + self.ft.lambda_anchor * anchor
        with torch.no_grad():
            hard = F.one_hot(masked.argmax(-1), logits.shape[-1]).float()
            r_hard, acc = hard_metrics(reward, hard, labels, self.info["num_classes"])
        return loss, {"reward": r.mean().detach(), "anchor": anchor.detach(), "reward_hard": r_hard,
                      "accuracy": acc}

    def _noise(self, step: int, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(batch_seed(self.cfg.run.seed, step, NOISE_SALT + 1000 * (self.dims.dp_rank + 1)))
        return g

    # ------------------------------------------------------------------ Trainer protocol

    def loss(self, model, batch: dict, step: int):
        faults.point("finetune.step", step=step, rank=D.rank())  # tests: a real crash mid-step
        return self._objective(model, batch, step, self._noise(step, batch["z"].device))

    @torch.no_grad()
    def eval_metrics(self, model, batch: dict) -> dict:
        loss, parts = self._objective(model, batch, 0, self._noise(-1, batch["z"].device))
        return {"loss": loss, **parts}

    def tokens_in_batch(self, batch: dict) -> int:
        return int(batch["z"].shape[0]) * self.info["seq_len"]

    def flops_per_sample(self) -> dict:
        gen = self.model if self.model is not None else self._load_source()
        fwd = gen.flops_per_sample(self.info["seq_len"]) / 3.0
        return {"student": 3.0 * fwd, "anchor": fwd}  # theta_0: forward only

    # ------------------------------------------------------------------ identity of the frozen inputs

    def checkpoint_meta(self) -> dict:
        i = self.info
        return {"source_export": i["export"], "source_sha256": i["export_sha256"], "reward": i["reward"],
                "reward_sha256": i["reward_sha256"]}

    def check_resume(self, saved: Optional[dict], path: str) -> None:
        """A checkpoint continues the fine-tuning of one theta_0 against one reward: refuse another."""
        if saved is None:
            raise PreflightError(f"{path}: this checkpoint records no source export (not a finetune checkpoint?); "
                                 f"start fresh with finetune.train.resume=none")
        now = self.checkpoint_meta()
        for key, sha, what in (("finetune.export", "source_sha256", "source_export"),
                               ("finetune.reward", "reward_sha256", "reward")):
            if saved.get(sha) != now[sha]:
                raise PreflightError(
                    f"{key}: checkpoint {path} was fine-tuned from {saved.get(what)} (sha256 {str(saved.get(sha))[:12]}) "
                    f"but {key} is now {now[what]} (sha256 {str(now[sha])[:12]}); theta_0 and the reward of a resumed "
                    f"run must be the ones it started with: point {key} back at them, or start fresh "
                    f"(finetune.train.resume=none, or move {self.cfg.run.dir}/finetune aside)")

    # ------------------------------------------------------------------ export

    def export_meta(self, trainer) -> dict:
        ft, i = self.ft, self.info
        return dict(i["meta"], train_step=int(trainer.step), weights="ema" if trainer.ema else "live",
                    finetune={"source_export": i["export"], "source_sha256": i["export_sha256"],
                              "reward": i["reward"], "reward_sha256": i["reward_sha256"],
                              "lambda_reward": ft.lambda_reward, "lambda_anchor": ft.lambda_anchor,
                              "anchor": ft.anchor, "relaxation": ft.relaxation, "tau": ft.tau,
                              "labels": ft.labels, "latent_scale": ft.latent_scale, "steps": int(trainer.step),
                              "source_train_step": i["meta"].get("train_step")})

    def export(self, trainer, out_dir: str) -> Optional[str]:
        """Collective: the EMA (or live) weights gathered over DP and TP; global rank 0 writes a
        generator export that ``load_generator`` / ``sample.export`` read like Stage B's."""
        from ...distributed.tensor_parallel import gather_full_state_dict
        from ...models.generator import export_generator

        sd = trainer.ema_state_dict() if trainer.ema is not None else trainer.full_state_dict()
        full = gather_full_state_dict(self.model, sd) if sd is not None else None
        path = None
        if D.is_main():
            path = export_generator(full, self.info["arch"], self.export_meta(trainer), out_dir)
        D.barrier()
        return path


def hard_metrics(reward, hard: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """(mean log p(y | x), class accuracy) of the reward classifier on one-hot samples ``hard``."""
    per_class = class_log_probs(reward, hard, num_classes)  # [B, C]
    r = per_class.gather(1, labels[:, None]).squeeze(1)
    return r.mean(), (per_class.argmax(1) == labels).float().mean()


def class_log_probs(reward, probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log p(c | x) for every class c: [B, C] (one classifier pass: ``guidance.reward.Reward``'s
    classifier input and network)."""
    w = reward.net.fc.weight
    logits = reward.net(reward.classifier_input(probs).to(device=w.device, dtype=w.dtype))
    return F.log_softmax(logits.float(), -1)[:, :num_classes]

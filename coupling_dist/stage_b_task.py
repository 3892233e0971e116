"""Stage B as a Trainer task (protocol: ``components/trainer.py``).

``StageBTask.from_store(cfg)`` reads the pair store's manifest and refuses, before any training,
a store or teacher that does not fit (``preflight``). The task then:

- builds the generator (``models/generator.py``) and, when ``stage_b.tp > 1``, shards it with
  megatron-core from outside (``distributed/tensor_parallel.py``); ``mpu`` hands the TP x DP groups
  to DeepSpeed and the Trainer;
- per training batch: picks one of the K stored latents per sample, replaces it with probability
  ``latent_mix_prob`` by N(0, I) * ``latent_mix_scale`` (and, for the masked denoiser, draws the
  mask time t ~ U(0, 1) and masks each position with probability t). These draws come from a
  generator seeded by (run.seed, step, data-parallel rank), not from the global RNG: every TP rank
  of a group must see the same inputs, and a resumed run replays them exactly;
- loss = CE + lambda_KD * KD from ``losses.kd_loss`` (chunked, vocab-parallel under TP); the frozen
  teacher (a HF causal LM, not part of the trained module, so neither DeepSpeed nor the EMA sees
  it) runs its trunk on the ground-truth tokens and only its head *shard* enters the loss;
- exports the EMA generator (full TP = 1 weights via ``gather_full_state_dict``) for sampling.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from .config import Config
from .losses.kd_loss import sequence_loss
from .models.generator import Generator, export_generator


class StageBPreflightError(ValueError):
    """The pair store / teacher / config do not fit together (raised before training)."""


def pair_store_dir(cfg: Config) -> str:
    return cfg.stage_dir("pair_store")


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def _teacher_path(ref: str) -> str:
    from . import assets

    path = assets.resolve(ref)
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise StageBPreflightError(f"stage_b.kd.teacher: '{path}' has no config.json (not a HF model directory)")
        return path
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if looks_like_path:
        raise StageBPreflightError(f"stage_b.kd.teacher: '{ref}' does not exist (expected a HF causal LM directory, "
                                   f"a hub id, or a tiny:/asset: reference)")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as e:  # offline hub ids fail here, before any training
        raise StageBPreflightError(f"stage_b.kd.teacher: '{ref}' is neither a directory nor a loadable hub id ({e})") from None
    return path


def preflight(cfg: Config) -> dict:
    """Everything the task needs from the pair store and the teacher, with clear errors."""
    from . import assets
    from .data.shards import Manifest

    store = pair_store_dir(cfg)
    where = os.path.join(store, "manifest.json")
    if not os.path.isfile(where):
        raise StageBPreflightError(f"{where} not found: run `python -m coupling_dist.pair_store` first")
    man = Manifest.load(store).to_dict()
    zspec = (man.get("fields") or {}).get("z")
    if not zspec:
        raise StageBPreflightError(f"{where}: no field 'z' (not a pair store?)")
    K, T, d = (int(x) for x in zspec["shape"])
    want_d = cfg.stage_a.latent_dim
    if d != want_d:
        raise StageBPreflightError(f"{where}: latent width of field 'z' is {d} but the generator's latent width "
                                   f"(stage_a.latent_dim) is {want_d}; rebuild the pair store or fix the config")
    if int(man["seq_len"]) != T:
        raise StageBPreflightError(f"{where}: seq_len {man['seq_len']} disagrees with field 'z' shape {zspec['shape']}")
    tok = man.get("tokenizer") or {}
    if not tok.get("vocab_size"):
        raise StageBPreflightError(f"{where}: manifest names no tokenizer vocab_size")
    tok_vocab = int(tok["vocab_size"])
    kd, tp = cfg.stage_b.kd, cfg.stage_b.tp
    masked = cfg.stage_b.model.kind == "masked"
    teacher = None
    if kd.teacher is not None and kd.weight > 0:
        path = _teacher_path(kd.teacher)
        t_tok = assets.tokenizer_identity(path)
        if tok.get("hash") and t_tok["hash"] != tok["hash"]:
            raise StageBPreflightError(
                f"stage_b.kd.teacher '{kd.teacher}' uses tokenizer {t_tok['name']!r} (vocab {t_tok['vocab_size']}, hash "
                f"{t_tok['hash']}) but the pair store {where} was tokenized with {tok.get('name')!r} (vocab "
                f"{tok.get('vocab_size')}, hash {tok['hash']}); KD needs the same tokenizer")
        from transformers import AutoConfig

        tconf = AutoConfig.from_pretrained(path, local_files_only=os.path.isdir(path))
        t_vocab = int(tconf.vocab_size)
        if t_vocab < tok_vocab + (1 if masked else 0):
            raise StageBPreflightError(f"stage_b.kd.teacher: vocabulary {t_vocab} is smaller than the tokenizer's "
                                       f"{tok_vocab}{' + a mask token' if masked else ''}")
        if t_vocab % tp:
            raise StageBPreflightError(f"stage_b.tp ({tp}) must divide the teacher vocabulary ({t_vocab}) for the "
                                       f"vocab-parallel head")
        teacher = {"path": path, "ref": kd.teacher, "vocab_size": t_vocab, "hidden": int(tconf.hidden_size),
                   "identity": assets.identity(path)}
        vocab = t_vocab  # student head split exactly like the teacher's
    else:
        # A multiple of 1024 for TP <= 8: the head's shape then does not depend on TP, so a
        # checkpoint can be resumed at another TP size (components.tp_reshape).
        vocab = _round_up(tok_vocab + (1 if masked else 0), math.lcm(1024, 128 * tp))
    mask_id = vocab - 1 if masked else None
    return {"store": store, "manifest": man, "K": K, "seq_len": T, "latent_dim": d, "vocab_size": vocab,
            "tokenizer": tok, "tok_vocab": tok_vocab, "teacher": teacher, "mask_token_id": mask_id,
            "eos_id": tok.get("eos_id"), "pad_id": tok.get("pad_id")}


def load_teacher(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=os.path.isdir(path), dtype=dtype)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_flops_per_token(model: nn.Module, seq_len: int, vocab: int) -> float:
    """Forward-only FLOPs per token of the teacher: 2 x (non-embedding params + head) + attention."""
    conf = model.config
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb - (0 if head is model.get_input_embeddings().weight else head.numel())
    return 2.0 * (body + conf.hidden_size * vocab) + 4.0 * seq_len * conf.hidden_size * conf.num_hidden_layers


class StageBTask:
    def __init__(self, cfg: Config, info: dict, mpu=None):
        self.cfg, self.info, self.mpu = cfg, info, mpu
        self.model: Optional[Generator] = None
        self._teacher: Optional[nn.Module] = None
        self.tp = cfg.stage_b.tp
        self.dp_rank = mpu.get_data_parallel_rank() if mpu is not None else None

    @classmethod
    def from_store(cls, cfg: Config, mpu=None) -> "StageBTask":
        return cls(cfg, preflight(cfg), mpu)

    # ------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        i = self.info
        model = Generator(self.cfg.stage_b.model, i["latent_dim"], i["seq_len"], i["vocab_size"], i["mask_token_id"])
        model.activation_checkpointing = bool(self.cfg.stage_b.train.activation_checkpointing)
        if self.tp > 1:
            if self.mpu is None:
                raise RuntimeError("stage_b.tp > 1 needs the parallel state (init_parallel) before build_model")
            from .distributed.tensor_parallel import apply_tensor_parallel

            model = apply_tensor_parallel(model, self.mpu.get_tensor_model_parallel_group())
        self.model = model
        return model

    def tp_partition_dims(self) -> dict:
        """Which parameters the TP layers split, along which dim (any TP size, 1 included): the
        Trainer saves it with each checkpoint so a run resumes at another ``stage_b.tp``."""
        from .distributed.tensor_parallel import partition_dims

        return partition_dims(self.model)

    def teacher(self, device: torch.device) -> Optional[nn.Module]:
        if self.info["teacher"] is None:
            return None
        if self._teacher is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self._teacher = load_teacher(self.info["teacher"]["path"], device, dtype)
        return self._teacher

    # ------------------------------------------------------------------ batches

    def _generator(self, step: int, salt: int) -> torch.Generator:
        dp = self.dp_rank if self.dp_rank is not None else _dp_rank()
        seed = (self.cfg.run.seed * 1_000_003 + step * 7919 + dp * 104_729 + salt) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def inputs(self, batch: dict, step: int, train: bool):
        """(z [B, T, d] fp32, tokens [B, T] long, mask [B, T] bool, x_t or None, ce_mask [B, T] bool)."""
        z_all = batch["z"]
        if z_all.dim() == 3:  # a store without the multiplicity axis
            z_all = z_all[:, None]
        B, K = z_all.shape[:2]
        dev = z_all.device
        g = self._generator(step, 0 if train else 1)
        k = torch.randint(0, K, (B,), generator=g) if (train and K > 1) else torch.zeros(B, dtype=torch.long)
        z = z_all[torch.arange(B), k.to(dev)].float()
        tokens, mask = batch["tokens"].long(), batch["mask"].bool()
        sb = self.cfg.stage_b
        if train and sb.latent_mix_prob > 0:
            mix = torch.rand(B, generator=g) < sb.latent_mix_prob
            noise = torch.randn(z.shape, generator=g) * sb.latent_mix_scale
            z = torch.where(mix.to(dev)[:, None, None], noise.to(dev, z.dtype), z)
        x_t, ce_mask = None, mask
        if self.info["mask_token_id"] is not None:
            t = torch.rand(B, 1, generator=g)
            masked = (torch.rand(tokens.shape, generator=g) < t).to(dev) & mask
            x_t = torch.where(masked, torch.full_like(tokens, self.info["mask_token_id"]), tokens)
            ce_mask = masked
        return z, tokens, mask, x_t, ce_mask

    # ------------------------------------------------------------------ Trainer protocol

    def _loss(self, model, batch: dict, step: int, train: bool):
        from .distributed.tensor_parallel import head_shard, tp_info

        z, tokens, mask, x_t, ce_mask = self.inputs(batch, step, train)
        h = model.hidden(z, x_t)
        w, start, V = head_shard(model)
        kd = self.cfg.stage_b.kd
        teacher = self.teacher(h.device)
        th = wt = None
        if teacher is not None:
            with torch.no_grad():
                base = getattr(teacher, teacher.base_model_prefix)
                th = base(input_ids=tokens, attention_mask=mask.long()).last_hidden_state.to(h.dtype)
                wt = teacher.get_output_embeddings().weight[start:start + w.shape[0]].to(h.dtype)
        size, _, group = tp_info(model)
        total, ce, kdv = sequence_loss(h, tokens, ce_mask, w, teacher_hidden=th, teacher_weight=wt,
                                       kd_mask=ce_mask if teacher is not None else None,
                                       temperature=kd.temperature, label_smoothing=self.cfg.stage_b.label_smoothing,
                                       lambda_kd=kd.weight if teacher is not None else 0.0, vocab_start=start,
                                       vocab_size=V, tp_group=group if size > 1 else None,
                                       chunk_rows=kd.chunk_positions, chunk_vocab=kd.chunk_vocab)
        return total, {"ce": ce, "kd": kdv}

    def loss(self, model, batch: dict, step: int):
        _fault_hook(step)
        return self._loss(model, batch, step, train=True)

    @torch.no_grad()
    def eval_metrics(self, model, batch: dict) -> dict:
        total, parts = self._loss(model, batch, 0, train=False)
        return {"loss": total, **parts}

    def tokens_in_batch(self, batch: dict) -> int:
        return int(batch["mask"].sum().item())

    def flops_per_sample(self) -> dict:
        i = self.info
        gen = self.model or Generator(self.cfg.stage_b.model, i["latent_dim"], i["seq_len"], i["vocab_size"],
                                      i["mask_token_id"])
        out = {"student": gen.flops_per_sample(i["seq_len"])}
        if i["teacher"] is not None:
            from .components import dist as D

            out["teacher"] = teacher_flops_per_token(self.teacher(D.device()), i["seq_len"], i["vocab_size"]) * i["seq_len"]
        return out

    def export_meta(self) -> dict:
        i = self.info
        return {"latent_dim": i["latent_dim"], "seq_len": i["seq_len"], "vocab_size": i["vocab_size"],
                "kind": self.cfg.stage_b.model.kind, "mask_token_id": i["mask_token_id"], "eos_id": i["eos_id"],
                "pad_id": i["pad_id"], "tokenizer": i["tokenizer"], "tokenizer_vocab_size": i["tok_vocab"],
                "teacher": (i["teacher"] or {}).get("identity"), "pair_store": os.path.abspath(i["store"])}

    def export(self, trainer, out_dir: str) -> Optional[str]:
        """Collective: every rank calls it. The EMA weights (or the live ones without EMA) are
        gathered over DP (Trainer) and TP (here); global rank 0 writes the TP = 1 export."""
        from .components import dist as D
        from .distributed.tensor_parallel import gather_full_state_dict

        sd = trainer.ema_state_dict() if trainer.ema is not None else trainer.full_state_dict()
        full = gather_full_state_dict(self.model, sd) if sd is not None else None
        path = None
        if D.is_main():
            meta = dict(self.export_meta(), train_step=int(trainer.step), weights="ema" if trainer.ema else "live")
            path = export_generator(full, self.cfg.stage_b.model, meta, out_dir)
        D.barrier()
        return path


def _fault_hook(step: int) -> None:
    """Tests only: ``COUPLING_DIST_FAULT_STAGE_B_STEP=N`` kills rank 0 (SIGKILL, no checkpoint) in the
    middle of step N, a real crash for the kill-and-resume test."""
    at = os.environ.get("COUPLING_DIST_FAULT_STAGE_B_STEP")
    if at is not None and int(at) == step:
        from .components import dist as D

        if D.rank() == 0:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def _dp_rank() -> int:
    from .components import dist as D

    return D.rank()

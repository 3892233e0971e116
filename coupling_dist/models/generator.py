"""Stage B generator: G(z) -> logits [B, T, V] (one-step) or H(x_t, z) -> logits (masked denoiser).

Plain PyTorch; no parallelism in here. ``coupling_dist.distributed.tensor_parallel`` swaps the
projections for megatron-core sharded ones *from outside* (the names q/k/v/o, gate/up/down,
fc_in/fc_out, ``head`` and ``tok_emb`` are the contract), so the same forward runs at TP = 1 and
TP > 1 (then ``forward`` returns this rank's vocabulary shard of the logits).

Layout: z [B, T, d] -> ``in_proj`` (d -> width) + learned ``pos_emb`` [T, width]
(+ ``tok_emb(x_t)`` for the masked kind) -> bidirectional ``Transformer`` (its final norm
included) -> ``head`` (width -> V, no bias). ``hidden()`` stops before the head so the loss can
apply the head in chunks without materialising [B, T, V] (``losses.kd_loss``).

Class conditioning (``num_classes`` > 0, ``data.num_classes``): ``cls_emb`` (num_classes + 1 rows,
the last the null class; ``models/conditioning.py``) of the label is added to the trunk input at
every position, G(z, y). Every generator kind is called ``model(z, x_t=None, labels=None)``:
``labels`` None -> every row unconditional, an entry -1 -> that row unconditional. ``cls_emb`` is
not a TP-swapped name: replicated under tensor parallelism.

Export (``export_generator``): ``model.safetensors`` + ``config.json`` (architecture + meta:
tokenizer reference, latent_dim, seq_len, vocab_size, kind, mask_token_id, eos_id, pad_id,
num_classes -- absent in older exports: 0 -- and cond_dropout),
written into a temp dir and renamed. ``load_generator`` needs only torch + safetensors: it must
never import DeepSpeed or megatron-core (sampling runs on machines without them).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import torch
from torch import nn

from ..components.atomic import write_dir
from .conditioning import ClassEmbedding, class_rows
from .layers import Transformer, transformer_flops_per_token, unpatch_states

FORMAT_VERSION = 1
ARCH_KEYS = ("kind", "width", "depth", "heads", "ffn", "norm", "act", "attention")


def _arch(cfg: Any) -> dict:
    """GeneratorConfig (dataclass) or a plain dict -> the architecture dict stored in config.json
    (a composite generator's arch is its Stage A config: ``models/composite_generator.py``)."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    if d.get("kind") == "composite":
        if "stage_a" not in d:
            raise ValueError("composite generator arch lacks its 'stage_a' config")
        return {"kind": "composite", "stage_a": d["stage_a"]}
    missing = [k for k in ARCH_KEYS if k not in d]
    if missing:
        raise ValueError(f"generator config lacks {missing}")
    return {k: d[k] for k in ARCH_KEYS}


def check_latents(z: torch.Tensor, seq_len: int, latent_dim: int) -> None:
    """A generator's input must be z [B, T <= seq_len, latent_dim] (``seq_len``: latent positions,
    the token length / stage_a.patch)."""
    if z.dim() != 3 or z.shape[-1] != latent_dim or z.shape[1] > seq_len:
        raise ValueError(f"z must be [B, T<={seq_len}, {latent_dim}], got {tuple(z.shape)}")


class Generator(nn.Module):
    def __init__(self, cfg: Any, latent_dim: int, seq_len: int, vocab_size: int,
                 mask_token_id: Optional[int] = None, patch: int = 1, num_classes: int = 0):
        super().__init__()
        a = _arch(cfg)
        self.arch = a
        self.kind = a["kind"]
        self.latent_dim, self.seq_len, self.vocab_size = int(latent_dim), int(seq_len), int(vocab_size)
        self.width = int(a["width"])
        # patch k > 1: z has seq_len / k positions, each emitting k tokens (Stage A's stage_a.patch)
        self.patch = int(patch)
        if self.patch > 1 and (self.kind == "masked" or self.seq_len % self.patch):
            raise ValueError(f"patch {self.patch} needs a one-step generator and a seq_len ({self.seq_len}) it divides")
        if self.kind == "masked":
            if mask_token_id is None or not 0 <= int(mask_token_id) < self.vocab_size:
                raise ValueError(f"masked generator needs a mask_token_id in [0, {self.vocab_size}), got {mask_token_id}")
        self.mask_token_id = None if mask_token_id is None else int(mask_token_id)
        self.in_proj = nn.Linear(self.latent_dim, self.width)
        self.pos_emb = nn.Parameter(torch.randn(self.seq_len // self.patch, self.width) * 0.02)
        self.tok_emb = nn.Embedding(self.vocab_size, self.width) if self.kind == "masked" else None
        if self.tok_emb is not None:
            nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.trunk = Transformer(self.width, int(a["depth"]), int(a["heads"]), int(a["ffn"]), norm=a["norm"],
                                 act=a["act"], backend=a["attention"])
        # not a TP-swapped name: replicated under tensor parallelism, before the vocab-parallel head
        self.unpatch = nn.Linear(self.width, self.patch * self.width) if self.patch > 1 else None
        self.head = nn.Linear(self.width, self.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=self.width ** -0.5)
        # created last, so an unconditional generator draws exactly the weights it always did;
        # the scale of in_proj(z) for unit-variance z
        self.num_classes = int(num_classes)
        self.cls_emb = ClassEmbedding(self.num_classes, self.width, std=0.5) if self.num_classes else None

    def hidden(self, z: torch.Tensor, x_t: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z [B, T, d] (x_t [B, T] long for the masked kind; labels [B] for a class-conditional
        generator, None / -1 = unconditional) -> final-normed hidden [B, T, width]."""
        check_latents(z, self.seq_len // self.patch, self.latent_dim)
        T = z.shape[1]
        x = self.in_proj(z.to(self.in_proj.weight.dtype)) + self.pos_emb[:T]
        if self.cls_emb is not None:  # the class at every position (the null row for None / -1)
            x = x + self.cls_emb(labels, z.shape[0])[:, None].to(x.dtype)
        elif labels is not None:
            class_rows(labels, 0, z.shape[0], z.device)  # raises: an unconditional model takes no labels
        if self.tok_emb is not None:
            if x_t is None:  # sampling's first step / one-step decoding: everything masked
                x_t = torch.full(z.shape[:2], self.mask_token_id, dtype=torch.long, device=z.device)
            x = x + self.tok_emb(x_t)
        h = self.trunk(x)
        return h if self.unpatch is None else unpatch_states(self.unpatch, h)

    def forward(self, z: torch.Tensor, x_t: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, V] (this rank's vocabulary shard under tensor parallelism)."""
        return self.head(self.hidden(z, x_t, labels))

    def flops_per_sample(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs (forward + backward = 3x forward matmuls) of one sample."""
        T = seq_len or self.seq_len
        a = self.arch
        if self.patch > 1:
            P = T // self.patch
            per_pos = transformer_flops_per_token(self.width, int(a["depth"]), int(a["ffn"]), P, a["act"])
            per_pos += 2 * self.latent_dim * self.width + 2 * self.width * self.patch * self.width
            return 3.0 * (per_pos * P + 2 * self.width * self.vocab_size * T)
        per_tok = transformer_flops_per_token(self.width, int(a["depth"]), int(a["ffn"]), T, a["act"])
        per_tok += 2 * self.latent_dim * self.width + 2 * self.width * self.vocab_size
        return 3.0 * per_tok * T


def build_generator(arch: Any, latent_dim: int, seq_len: int, vocab_size: int,
                    mask_token_id: Optional[int] = None, patch: int = 1, num_classes: int = 0) -> nn.Module:
    """The generator an arch dict (or GeneratorConfig) describes: ``Generator`` or the composite
    (whose patch is its Stage A config's; ``patch`` must agree); ``num_classes`` > 0: G(z, y)."""
    a = _arch(arch)
    if a["kind"] == "composite":
        from .composite_generator import CompositeGenerator

        g = CompositeGenerator(a, latent_dim, seq_len, vocab_size, num_classes)
        if g.patch != int(patch):
            raise ValueError(f"patch {patch} differs from the composite's Stage A stage_a.patch {g.patch}")
        return g
    return Generator(a, latent_dim, seq_len, vocab_size, mask_token_id, patch, num_classes)


# --------------------------------------------------------------------------- export / load


def export_generator(model_or_state, cfg: Any, meta: dict, out_dir: str) -> str:
    """Write ``out_dir`` atomically. ``model_or_state``: a TP = 1 ``Generator`` or its full state dict
    (e.g. the EMA weights from ``gather_full_state_dict``). ``meta`` must give latent_dim, seq_len,
    vocab_size; it should give tokenizer, eos_id, pad_id (and mask_token_id for the masked kind)."""
    from safetensors.torch import save_file

    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()
          if torch.is_tensor(v) and not k.endswith("_extra_state")}
    arch = _arch(cfg)
    for key in ("latent_dim", "seq_len", "vocab_size"):
        if key not in meta:
            raise ValueError(f"export_generator: meta lacks '{key}'")
    full_meta = {"kind": arch["kind"], "mask_token_id": None, "eos_id": None, "pad_id": None, "tokenizer": None,
                 "num_classes": 0, "cond_dropout": 0.0}
    full_meta.update(meta)
    full_meta["kind"] = arch["kind"]
    conf = {"format": "coupling_dist.generator", "version": FORMAT_VERSION, "arch": arch, "meta": full_meta}
    # Validate before writing: the weights must load into the architecture they claim.
    probe = build_generator(arch, full_meta["latent_dim"], full_meta["seq_len"], full_meta["vocab_size"],
                            full_meta.get("mask_token_id"), full_meta.get("patch", 1), int(full_meta["num_classes"]))
    probe.load_state_dict(sd, strict=True)

    def write(tmp):
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(conf, fh, indent=2, default=str)

    return write_dir(out_dir, write)


def read_export_config(export_dir: str) -> dict:
    path = os.path.join(export_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no generator export at '{export_dir}' (missing config.json)")
    with open(path, encoding="utf-8") as fh:
        conf = json.load(fh)
    if conf.get("format") != "coupling_dist.generator":
        raise ValueError(f"{path}: not a coupling_dist generator export (format {conf.get('format')!r})")
    if int(conf.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: export version {conf['version']} is newer than this code ({FORMAT_VERSION})")
    return conf


def load_generator(export_dir: str, device="cpu") -> tuple[nn.Module, dict]:
    """(Generator in eval mode on ``device``, meta dict). Needs torch + safetensors only."""
    from safetensors.torch import load_file

    conf = read_export_config(export_dir)
    meta = dict(conf["meta"])
    meta.setdefault("num_classes", 0)  # exports from before class conditioning: unconditional
    model = build_generator(conf["arch"], meta["latent_dim"], meta["seq_len"], meta["vocab_size"], meta.get("mask_token_id"),
                            meta.get("patch", 1), int(meta["num_classes"]))
    wpath = os.path.join(export_dir, "model.safetensors")
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"generator export '{export_dir}' lacks model.safetensors")
    model.load_state_dict(load_file(wpath), strict=True)
    model.to(device).eval()
    return model, meta

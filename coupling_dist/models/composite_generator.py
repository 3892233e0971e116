"""The composite one-step generator: G(z) = D(NF^-1(z)), warm-started from the Stage A export.

Why (docs/QUALITY_RESEARCH.md, finding 6). Stage B learns the map z -> x that Stage A already
defines: the inverse flow followed by the decoder. A transformer generator trained from scratch on
a small pair store has to rediscover that map and overfits it (held-out CE 0.42 -> 0.49 while the
train CE reached 0.09; 17.8 % valid one-step samples on our grammar benchmark), while the
composite, initialised with Stage A's own weights, starts at exactly Stage A's z -> x map and is
fine-tuned on the pairs (held-out CE 0.18, 46-65 % valid). With RealNVP the inverse flow is one
parallel pass per coupling, so G is still a one-step generator: no position waits for another.

This is our departure from the paper, which trains a separate transformer generator from
scratch (its released DNA code warm-starts the generator from the Stage A decoder only). Select it
with ``stage_b.model.kind: composite``; width/depth/... of ``stage_b.model`` are then ignored (the
architecture is Stage A's, recorded in the export).

Layout: the module names ``flow``, ``dec_in``, ``decoder`` equal Stage A's, so the Stage A state
dict initialises them directly. The head is bias-free (the loss and the samplers read
``head.weight`` only, ``losses/kd_loss.py``): Stage A's head bias becomes one extra weight column
fed by a constant 1 appended to the hidden state, so ``hidden() @ head.weight.T`` equals Stage A's
logits exactly. Head rows beyond Stage A's vocabulary (Stage B pads its head to a multiple of 1024
or to the teacher's vocabulary) start at a large negative logit.

Class conditioning (``num_classes`` > 0): the Stage A flow is class-conditional, so the composite
is G(z, y) = D(NF^-1(z; y)) with the flow's class embeddings (null class for labels None / -1:
the unconditional flow Stage A's conditioning dropout trained), warm-started like the rest.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from .generator import check_latents
from .layers import Transformer, transformer_flops_per_token
from .stage_a import build_flow, decoder_states

UNUSED_ROW_LOGIT = -30.0  # initial logit of head rows Stage A never had (exp(-30) ~ 1e-13)


def stage_a_config(arch: dict):
    """The StageAConfig recorded in a composite arch dict."""
    from ..config import StageAConfig, section_from_dict

    return section_from_dict(StageAConfig, arch["stage_a"], "stage_a", "composite generator arch")


class CompositeGenerator(nn.Module):
    kind = "composite"

    def __init__(self, arch: dict, latent_dim: int, seq_len: int, vocab_size: int, num_classes: int = 0):
        super().__init__()
        self.arch = {"kind": "composite", "stage_a": dict(arch["stage_a"])}
        cfg = stage_a_config(self.arch)
        if cfg.flow.kind != "realnvp":
            raise ValueError(f"a composite generator needs a RealNVP flow (its inverse is one parallel pass); "
                             f"the Stage A export has stage_a.flow.kind={cfg.flow.kind!r}")
        if int(latent_dim) != cfg.latent_dim:
            raise ValueError(f"latent_dim {latent_dim} differs from the Stage A config's {cfg.latent_dim}")
        self.latent_dim, self.seq_len, self.vocab_size = int(latent_dim), int(seq_len), int(vocab_size)
        self.patch = int(cfg.patch)  # tokens per latent position (Stage A's stage_a.patch)
        dc = cfg.decoder
        self.num_classes = int(num_classes)
        self.flow = build_flow(self.latent_dim, cfg.flow, self.num_classes)
        self.dec_in = nn.Linear(self.latent_dim, dc.width)
        self.decoder = Transformer(dc.width, dc.depth, dc.heads, dc.ffn)
        self.unpatch = nn.Linear(dc.width, self.patch * dc.width) if self.patch > 1 else None
        self.head = nn.Linear(dc.width + 1, self.vocab_size, bias=False)
        self._dec_cfg = dc

    @torch.no_grad()
    def load_stage_a(self, state: dict) -> None:
        """Initialise from a Stage A state dict (``models/stage_a_export.load_stage_a``'s weights)."""
        own = {k: v for k, v in state.items() if k.split(".")[0] in ("flow", "dec_in", "decoder", "unpatch")}
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(f"Stage A weights do not fit the composite generator (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        w, b = state["head.weight"], state["head.bias"]
        if w.shape[0] > self.vocab_size:
            raise ValueError(f"Stage A head has {w.shape[0]} rows, more than the generator's {self.vocab_size}")
        self.head.weight.zero_()
        self.head.weight[:, -1] = UNUSED_ROW_LOGIT
        self.head.weight[: w.shape[0], :-1] = w.to(self.head.weight)
        self.head.weight[: w.shape[0], -1] = b.to(self.head.weight)

    def hidden(self, z: torch.Tensor, x_t: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z [B, T / patch, d] -> [B, T, width + 1] (the decoder's hidden state and a constant 1)."""
        check_latents(z, self.seq_len // self.patch, self.latent_dim)
        z = z.to(self.dec_in.weight.dtype)
        everywhere = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        u = self.flow.inverse(z, everywhere, labels=labels)  # an unconditional flow refuses labels
        h = decoder_states(self.dec_in, self.decoder, u, everywhere, self.unpatch)
        return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)

    def forward(self, z: torch.Tensor, x_t: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.hidden(z, labels=labels))

    def flops_per_sample(self, seq_len: Optional[int] = None) -> float:
        T = seq_len or self.seq_len
        dc, k = self._dec_cfg, self.patch
        P = T // k  # latent positions
        per_pos = self.flow.flops_per_token(P) + 2 * self.latent_dim * dc.width
        per_pos += transformer_flops_per_token(dc.width, dc.depth, dc.ffn, P) + (2 * dc.width * k * dc.width if k > 1 else 0)
        return 3.0 * (per_pos * P + 2 * (dc.width + 1) * self.vocab_size * T)


def composite_arch(stage_a_cfg: Any) -> dict:
    """The arch dict of a composite generator built on this StageAConfig (dataclass or dict)."""
    d = dataclasses.asdict(stage_a_cfg) if dataclasses.is_dataclass(stage_a_cfg) else dict(stage_a_cfg)
    return {"kind": "composite", "stage_a": d}

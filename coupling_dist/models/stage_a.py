"""Stage A: sequence -> Gaussian coupling (projection, dequantization noise, flow, light decoder).

    features [B, T, H] --normalise--> proj --> mean [B, T, d]
    u = mean + sigma * eps                      (sigma = noise_scale, or a learned log-variance)
    z, logdet = flow(u, mask)                   (RealNVP or TarFlow; z ~ N(0, I) after training)
    logits = head(decoder(u))                   (reconstruction of the tokens from u)

    L = lambda_rec * CE + lambda_KL * KL(q(u|x) || N(0, I)) + lambda_flow(step) * NLL_flow

Normalisation of the three terms (stated because their relative weights depend on it). Eq. 1
sums each term over the sequence: CE over the T positions, KL and the flow NLL over the T x d
latent elements. We divide all three by the number of scored positions (a constant per batch: the
same optimum, and Adam is invariant to the overall scale), so the loss is CE per position +
lambda_KL * KL per position + lambda_flow * NLL per position (each summed over the d channels), and
the lambdas mean what the paper's mean (Table 7: lambda_flow 0.5 -> 1). Until 2026-11 the KL and
flow terms were per-element means, which weighed the flow d times less than Eq. 1 does (256x at
the paper's width): the quality research found that the flow must weigh as much as Eq. 1 says
(docs/QUALITY_RESEARCH.md). The logged ``kl`` and ``flow_nll`` stay per element, so ``bpd`` =
flow_nll / ln 2 is the usual bits-per-dim of a continuous density (it can be negative).

Length (``stage_a.pad_positions``). The paper pads every sequence to T (EOS, then pads) and
applies E, the flow and D to all T positions (Algorithm 1; Eq. 2 is a product over all T): with
"encoded" (the default) every term covers every position and the flow runs without a mask, so
the length is part of what z encodes and Stage B learns where sentences end. The frozen encoder's
features at pad positions are what the LM computes there when it reads the padded sequence with
full attention (the text, its EOS, then pad = EOS ids: see ``data/source.PAD_FEATURES``).
"passthrough" is the earlier design, kept as an ablation: at pads u is plain eps, the flow passes
pads through unchanged, and every term covers real positions only; the flow then models
p(u_real | mask), and at its optimum z is independent of the length.

Encoder input (``feature_dim``). With frozen-LM features (``feature_dim`` > 0) the posterior mean
is a linear projection of the normalised features. With ``feature_dim`` = 0 (shards preprocessed
with ``encoder.model: null``: tokens only) Stage A learns a token embedding instead, the encoder
of the paper's released text code (a learned embedding followed by a linear map, which composes to
one embedding table): the input is then the token ids as head rows (compact ids under
``data.vocab: corpus``). On small corpora this trains far better than frozen contextual features
(docs/QUALITY_RESEARCH.md: the flow must model a joint over T positions; per-token latents of a
learned embedding give it the least to model).

Feature normalisation statistics (per-channel mean/std of the frozen encoder features) live in the
model as buffers so that the export carries them; they are estimated from the first batches
(``estimate_feature_stats``) or passed in (``set_feature_stats``). Empty for the token embedding.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import StageAConfig
from ..data.dtypes import from_stored
from .layers import Transformer, transformer_flops_per_token, unpatch_states
from .realnvp import RealNVP, safe_key_mask, sinusoidal_positions
from .tarflow import TarFlow

LOG_2PI = math.log(2 * math.pi)
CE_CHUNK_ROWS = 256  # rows of [N_real, V] logits materialised at once (V is ~152k for Qwen)


def decoder_states(dec_in: nn.Linear, decoder: Transformer, u: torch.Tensor, scored: torch.Tensor,
                   unpatch: Optional[nn.Linear] = None) -> torch.Tensor:
    """The light decoder's hidden states [B, T, width]: input projection + sinusoidal positions,
    then the transformer over the ``scored`` positions (shared with the composite generator, which
    must reproduce Stage A's decoder exactly). With a patch of k tokens per latent position
    (``unpatch``: width -> k * width) each of the T / k positions' states becomes its k tokens'."""
    h = dec_in(u) + sinusoidal_positions(u.shape[1], dec_in.out_features, u.device, u.dtype)
    h = decoder(h, safe_key_mask(scored))
    return h if unpatch is None else unpatch_states(unpatch, h)


def patch_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, C] -> [B, T/k, k*C]: the k consecutive tokens of each latent position side by side."""
    if k == 1:
        return x
    B, T, C = x.shape
    if T % k:
        raise ValueError(f"sequence length {T} is not a multiple of stage_a.patch {k}")
    return x.reshape(B, T // k, k * C)


def build_flow(dim: int, fc, num_classes: int = 0) -> nn.Module:
    cls = {"realnvp": RealNVP, "tarflow": TarFlow}.get(fc.kind)
    if cls is None:
        raise ValueError(f"stage_a.flow.kind '{fc.kind}' is not one of realnvp|tarflow")
    kw = {}
    if num_classes:
        if cls is not RealNVP:
            raise ValueError(f"a class-conditional flow (data.num_classes = {num_classes}) needs stage_a.flow.kind "
                             f"realnvp, not {fc.kind!r}")
        kw["num_classes"] = int(num_classes)
    if fc.conditioner != "transformer":  # exports from before the key load with its default
        if cls is not RealNVP:
            raise ValueError(f"stage_a.flow.conditioner {fc.conditioner!r} needs stage_a.flow.kind realnvp")
        kw.update(conditioner=fc.conditioner, positions=fc.positions)
    return cls(dim, layers=fc.layers, hidden=fc.hidden, depth=fc.depth, heads=fc.heads,
               ffn=getattr(fc, "ffn", None), scale_bound=fc.scale_bound, **kw)


class StageAModel(nn.Module):
    def __init__(self, feature_dim: int, vocab_size: int, cfg: StageAConfig, num_classes: int = 0):
        super().__init__()
        self.cfg = cfg
        # > 0 (data.num_classes): the flow is class-conditional, NF(u; y) (models/realnvp.py); the
        # encoder and decoder are not: the class enters the coupling where the paper's code puts it
        self.num_classes = int(num_classes)
        self.feature_dim, self.vocab_size, self.latent_dim = feature_dim, vocab_size, cfg.latent_dim
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.register_buffer("feat_stats_set", torch.zeros((), dtype=torch.bool))
        d = cfg.latent_dim
        self.patch = k = int(cfg.patch)
        self.proj = self.embed = self.logvar = self.patch_in = self.unpatch = None
        if feature_dim > 0:
            self.proj = nn.Linear(k * feature_dim, d)
        else:  # learned token embedding; unit-scale rows so tokens start well apart relative to sigma
            self.embed = nn.Embedding(vocab_size, d)
            nn.init.normal_(self.embed.weight, std=1.0)
            if k > 1:  # k token embeddings side by side -> one latent position
                self.patch_in = nn.Linear(k * d, d)
        if cfg.learned_logvar:
            # Starts at log(sigma^2) everywhere, i.e. exactly the fixed-noise model.
            if self.embed is None or k > 1:
                self.logvar = nn.Linear(k * (feature_dim or d), d)
                nn.init.zeros_(self.logvar.weight)
                nn.init.constant_(self.logvar.bias, 2 * math.log(cfg.noise_scale))
            else:
                self.logvar = nn.Embedding(vocab_size, d)
                nn.init.constant_(self.logvar.weight, 2 * math.log(cfg.noise_scale))
        self.flow = build_flow(d, cfg.flow, self.num_classes)
        dc = cfg.decoder
        self.dec_in = nn.Linear(d, dc.width)
        self.decoder = Transformer(dc.width, dc.depth, dc.heads, dc.ffn)
        if k > 1:  # each latent position's state -> its k tokens' states (decoder_states)
            self.unpatch = nn.Linear(dc.width, k * dc.width)
        self.head = nn.Linear(dc.width, vocab_size)

    # ------------------------------------------------------------------ normalisation statistics

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != (self.feature_dim,) or std.shape != (self.feature_dim,):
            raise ValueError(f"feature stats must have shape [{self.feature_dim}], got {tuple(mean.shape)}/{tuple(std.shape)}")
        with torch.no_grad():
            self.feat_mean.copy_(mean.to(self.feat_mean))
            self.feat_std.copy_(std.to(self.feat_std).clamp_min(1e-6))
            self.feat_stats_set.fill_(True)

    @staticmethod
    def estimate_feature_stats(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean/std over the real tokens of (features [B,T,H], mask [B,T]) batches (float64 sums)."""
        s = s2 = None
        n = 0
        for feats, mask in batches:
            x = from_stored(feats).double()[mask.bool()]
            s = x.sum(0) if s is None else s + x.sum(0)
            s2 = x.pow(2).sum(0) if s2 is None else s2 + x.pow(2).sum(0)
            n += x.shape[0]
        if not n:
            raise ValueError("no real tokens to estimate feature statistics from")
        mean = s / n
        std = (s2 / n - mean.pow(2)).clamp_min(0).sqrt()
        return mean.float(), std.float()

    @property
    def dtype(self) -> torch.dtype:
        return self.dec_in.weight.dtype

    @property
    def embeds_tokens(self) -> bool:
        """True: the encoder input is token ids (head rows), not stored features."""
        return self.embed is not None

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        x = from_stored(features).to(self.feat_mean.dtype)
        return ((x - self.feat_mean) / self.feat_std).to(self.dtype)

    # ------------------------------------------------------------------ the coupling

    def posterior(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(u|x) = N(mean, exp(logvar)) per element, [B, T, d] each. ``source``: features
        [B, T, H], or token ids [B, T] (head rows) for the token-embedding encoder."""
        h = source.long() if self.embed is not None else self.normalize(source)
        if self.patch > 1:  # [B, T/k, k * C]: a latent position reads its k tokens
            h = patch_rows(self.embed(h) if self.embed is not None else h, self.patch)
            mean = self.patch_in(h) if self.patch_in is not None else self.proj(h)
        else:
            mean = self.embed(h) if self.embed is not None else self.proj(h)
        if self.logvar is not None:
            logvar = self.logvar(h).clamp(-12.0, 6.0)
        else:
            logvar = torch.full_like(mean, 2 * math.log(self.cfg.noise_scale))
        return mean, logvar

    def latent_len(self, seq_len: int) -> int:
        """Latent positions of a ``seq_len``-token sequence (T / stage_a.patch)."""
        return int(seq_len) // self.patch

    def scored(self, mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: the positions the coupling encodes and scores (all of them unless the
        "passthrough" ablation is on, where only real tokens are). ``like`` gives the shape:
        tokens [B, T], or a latent [B, T / patch, d] (patch > 1 needs "encoded": config.py)."""
        if mask is None or self.cfg.pad_positions == "encoded":
            return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
        return mask.bool()

    def encode_latent(self, source: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      eps: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """u = E(x, eps) = mean + sigma * eps (at every position; eps itself at pads under the
        "passthrough" ablation). ``source`` as in ``posterior``."""
        mean, logvar = self.posterior(source)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        real = mean + torch.exp(0.5 * logvar) * eps
        return torch.where(self.scored(mask, mean)[..., None], real, eps.to(real.dtype))

    def to_gaussian(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = NF(u; labels) (labels None / -1: the null class of a conditional flow)."""
        return self.flow(u, self.scored(mask, u), **_labels_kw(labels))[0]

    def from_gaussian(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.flow.inverse(z, self.scored(mask, z), **_labels_kw(labels))

    def decoder_hidden(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return decoder_states(self.dec_in, self.decoder, u, self.scored(mask, u), self.unpatch)

    def decode(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full logits [B, T, V] (inference/small V; the loss never materialises them all)."""
        return self.head(self.decoder_hidden(u, mask))

    # ------------------------------------------------------------------ loss

    def lambda_flow(self, step: int) -> float:
        c = self.cfg
        ramp = c.flow_anneal_fraction * c.train.steps
        frac = 1.0 if ramp <= 0 else min(1.0, max(0, step) / ramp)
        return c.lambda_flow_start + (c.lambda_flow_end - c.lambda_flow_start) * frac

    def _ce_chunk(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(h).float()
        return (F.cross_entropy(logits, target, reduction="sum"),
                (logits.argmax(-1) == target).sum().to(logits.dtype))

    def reconstruction(self, u: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE sum, #correct) over the scored positions, in row chunks: with V ~ 152k, materialising
        all [B*T, V] logits (plus their gradient) would take gigabytes; each chunk's logits are
        recomputed in backward instead of stored."""
        m = self.scored(mask, tokens)
        h = self.decoder_hidden(u, mask)[m]
        target = tokens[m].long()
        ce = h.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.float32, device=h.device)
        big = self.vocab_size * CE_CHUNK_ROWS > 4_000_000 and torch.is_grad_enabled()
        # a small vocabulary (binary pixels: V = 2) takes all rows at once: 256-row chunks of
        # 50k pixel tokens would be ~200 tiny matmuls per step
        rows = CE_CHUNK_ROWS if big or self.vocab_size >= 1024 else max(CE_CHUNK_ROWS, h.shape[0])
        for i in range(0, h.shape[0], rows):
            hc, tc = h[i:i + rows], target[i:i + rows]
            l, c = checkpoint(self._ce_chunk, hc, tc, use_reentrant=False) if big else self._ce_chunk(hc, tc)
            ce, correct = ce + l, correct + c
        return ce, correct

    def loss(self, source: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, step: int = 0,
             eps: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """``labels`` [B] (conditional flows; -1 = the null class, what conditioning dropout feeds)."""
        mean, logvar = self.posterior(source)
        m = self.scored(mask, mean)  # latent positions (= token positions at patch 1)
        mf = m[..., None].to(self.dtype)
        # Eq. 1's sums, divided by the number of scored *tokens* (module docstring); per latent
        # element for the logged kl / flow_nll (``per_lat`` = tokens per latent position)
        n_tok = self.scored(mask, tokens).sum().clamp_min(1) if self.patch > 1 else m.sum().clamp_min(1)
        per_lat = self.patch if self.patch > 1 else 1
        n_el = n_tok * self.latent_dim // per_lat
        if eps is None:
            eps = torch.randn_like(mean)
        u = torch.where(m[..., None], mean + torch.exp(0.5 * logvar) * eps, eps)
        # KL(N(mean, var) || N(0, 1)) per element, closed form.
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        kl = (kl * mf).sum() / n_tok  # Eq. 1's sums, per position (module docstring)
        z, logdet = self.flow(u, m, **_labels_kw(labels))
        nll = ((0.5 * z.pow(2) + 0.5 * LOG_2PI) * mf).sum() - logdet.sum()
        nll = nll / n_tok
        ce_sum, correct = self.reconstruction(u, tokens, mask)  # over the scored tokens
        ce = ce_sum / n_tok
        c = self.cfg
        lam = self.lambda_flow(step)
        total = c.lambda_rec * ce + c.lambda_kl * kl + lam * nll
        kl, nll = kl * per_lat / self.latent_dim, nll * per_lat / self.latent_dim  # logged per element
        metrics = {"loss": total.detach(), "ce": ce.detach(), "kl": kl.detach(), "flow_nll": nll.detach(),
                   "bpd": nll.detach() / math.log(2), "rec_acc": correct / n_tok,
                   "logdet_per_dim": logdet.sum().detach() / n_el, "lambda_flow": torch.tensor(lam),
                   "z_std": z.detach()[m].std() if m.sum() > 1 else torch.tensor(0.0)}
        return total, metrics

    # ------------------------------------------------------------------ accounting

    def flops_per_sample(self, seq_len: int) -> float:
        """Training FLOPs per sequence (forward matmuls x 3 for forward + backward)."""
        d, H, dc, k = self.latent_dim, self.feature_dim, self.cfg.decoder, self.patch
        if k > 1:  # per latent position (T / k of them), then the per-token head
            P = seq_len // k
            per_pos = 2 * k * (H or d) * d * (2 if self.logvar is not None else 1) + self.flow.flops_per_token(P)
            per_pos += 2 * d * dc.width + transformer_flops_per_token(dc.width, dc.depth, dc.ffn, P)
            per_pos += 2 * dc.width * k * dc.width
            return 3.0 * (P * per_pos + seq_len * 2 * dc.width * self.vocab_size)
        per_tok = 2 * H * d * (2 if self.logvar is not None else 1)  # 0 for the token embedding
        per_tok += self.flow.flops_per_token(seq_len)
        per_tok += 2 * d * dc.width + transformer_flops_per_token(dc.width, dc.depth, dc.ffn, seq_len)
        per_tok += 2 * dc.width * self.vocab_size
        return 3.0 * seq_len * per_tok


def _labels_kw(labels: Optional[torch.Tensor]) -> dict:
    """No ``labels`` argument at all for None: a TarFlow (unconditional only) takes none."""
    return {} if labels is None else {"labels": labels}


def source_of_samples(model: StageAModel, samples: list[dict], vocab=None, device="cpu", features=None) -> torch.Tensor:
    """The encoder input of shard samples: their stored features, or those ``features`` (the online
    frozen encoder: token ids -> features) computes from their tokens, or for the token-embedding
    encoder their token ids as head rows (``vocab``: the export's ``CompactVocab``, or None)."""
    if model.embeds_tokens or features is not None:
        tok = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
        if not model.embeds_tokens:
            return features(tok.to(device))
        return (tok if vocab is None else vocab.to_compact(tok)).to(device)
    return torch.from_numpy(np.stack([s["features"] for s in samples])).to(device)


class PriorDecoder(nn.Module):
    """The paper's flow-reverse diagnostic as a one-step generator: ``forward(z)`` = the Stage A
    decoder's logits at u = NF^-1(z). Sampling it with z ~ N(0, s^2 I) (``sample.kind=stage_a``)
    shows what the coupling itself generates: an upper bound on what Stage B, trained to invert
    the same pairs, can reach."""

    def __init__(self, stage_a: "StageAModel"):
        super().__init__()
        self.stage_a = stage_a
        self.num_classes = stage_a.num_classes

    def forward(self, z: torch.Tensor, x_t: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The generator call signature (``x_t`` unused): D(NF^-1(z; labels))."""
        return self.stage_a.decode(self.stage_a.from_gaussian(z, labels=labels))

"""One-step sampling from a latent-to-sequence generator G(z) -> logits [B, T, V].

z ~ N(0, s^2 I) of shape [T, d] per sample, one forward pass, temperature and top-p at every
position, all positions sampled in parallel.

Reproducibility: every sample owns a CPU ``torch.Generator`` seeded from (seed, sample index) by
``numpy.random.SeedSequence``; it draws the sample's latent and then one uniform per position
per step. A sample's output is therefore a function of (seed, index, settings, weights) only:
independent of the batch size, of how many ranks share the work, and of which rank draws it.
(The forward pass itself is deterministic up to the floating-point behaviour of the backend for
a given batch shape; on CPU and in the tests the ids are identical across batch sizes.)

Class-conditional exports (meta ``num_classes`` > 0): sample ``index`` has the class
``settings.label``, or ``index % num_classes`` when that is -1 (balanced classes) -- a function of
the index too, so the contract above holds. ``settings.guidance`` says which logits are sampled:
``none`` the conditional G(z, y), ``cfg`` classifier-free guidance at ``settings.cfg_scale``
(``guidance/cfg.py``, Algorithm 4; two generator passes, one at scale 0 or 1), ``classifier``
latent classifier guidance (Algorithm 5, not wired into the sampler here: refused with a clear
error). An unconditional export refuses a label or guidance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .top_p import DEFAULT_K, apply_temperature, sample_top_p


@dataclass
class SampleSettings:
    temperature: Union[float, list] = 0.6  # a float, or per-position [T] for one step / per-step [K] for P2
    top_p: float = 0.95
    latent_scale: float = 0.85
    steps: int = 1  # few-step K (masked denoisers only)
    eta: float = 1.0
    kappa: str = "linear"  # P2-self unmasking schedule (Algorithm 3: any monotone kappa; linear default)
    proposal_top_p: float = 1.0  # P2-self proposals: no nucleus unless asked (Algorithm 3)
    seed: int = 0
    top_k_prefilter: int = DEFAULT_K
    guidance: str = "none"  # none | cfg | classifier (class-conditional exports)
    cfg_scale: float = 1.0  # classifier-free guidance scale s (guidance cfg)
    label: int = -1  # -1: balanced classes (index % num_classes); k >= 0: every sample is class k
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d.pop("top_k_prefilter")
        if d["guidance"] == "none" and d["label"] == -1 and d["cfg_scale"] == 1.0:
            for k in ("guidance", "cfg_scale", "label"):  # records of unguided runs stay as they were
                d.pop(k)
        return d


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` (a pure function of (seed, index))."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state[0]) | (int(state[1]) << 32))
    return g


def draw_latents(gens: Sequence[torch.Generator], seq_len: int, latent_dim: int, scale: float) -> torch.Tensor:
    """z [B, T, d] ~ N(0, scale^2 I), one row per generator (drawn first from each generator)."""
    return torch.stack([torch.randn(seq_len, latent_dim, generator=g) for g in gens]) * float(scale)


def draw_uniforms(gens: Sequence[torch.Generator], seq_len: int) -> torch.Tensor:
    """u [B, T] in [0, 1): the next draw of each generator (one per position)."""
    return torch.stack([torch.rand(seq_len, generator=g, dtype=torch.float64) for g in gens])


def banned_ids(meta: dict, vocab_limit: Optional[int] = None, device="cpu") -> torch.Tensor:
    """Token ids a sampler must never emit: the mask token of a masked denoiser, and model-vocab
    ids beyond the tokenizer's vocabulary (Qwen pads its 151,669 tokens to 151,936 rows)."""
    V = int(meta["vocab_size"])
    ids = []
    if vocab_limit is not None and vocab_limit < V:
        ids.extend(range(int(vocab_limit), V))
    if meta.get("kind") == "masked" and meta.get("mask_token_id") is not None:
        ids.append(int(meta["mask_token_id"]))
    return torch.tensor(sorted(set(i for i in ids if 0 <= i < V)), dtype=torch.long, device=device)


def check_guidance(meta: dict, settings: SampleSettings) -> int:
    """The export's number of classes, after refusing settings it cannot honour (``ConfigError``
    naming the sample key)."""
    from ..config import ConfigError

    n = int(meta.get("num_classes") or 0)
    if settings.guidance not in ("none", "cfg", "classifier"):
        raise ConfigError(f"sample.guidance = {settings.guidance!r} must be one of none|cfg|classifier")
    if not n and (settings.guidance != "none" or settings.label >= 0):
        raise ConfigError(f"sample.guidance = {settings.guidance!r} / sample.label = {settings.label}: the export is "
                          f"unconditional (num_classes 0; trained with data.num_classes = 0), it takes no class")
    if settings.label >= n > 0:
        raise ConfigError(f"sample.label = {settings.label} but the export has {n} classes (0..{n - 1}; -1 = balanced)")
    if settings.guidance == "classifier":
        raise ConfigError("sample.guidance = classifier (latent classifier guidance, Algorithm 5) is not wired into "
                          "the sampler yet; use sample.guidance=cfg or none")
    return n


def sample_labels(indices: Sequence[int], settings: SampleSettings, num_classes: int) -> Optional[torch.Tensor]:
    """Classes [B] of samples ``indices`` (None for an unconditional export): ``settings.label``, or
    balanced (index % num_classes) for -1."""
    if not num_classes:
        return None
    if settings.label >= 0:
        return torch.full((len(indices),), int(settings.label), dtype=torch.long)
    return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)


def guided_logits(model, z: torch.Tensor, labels: Optional[torch.Tensor], settings: SampleSettings,
                  x_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The logits a sampler draws from: ``model(z[, x_t])`` unconditionally (exactly the call of an
    unconditional run), G(z, y) for guidance none, Algorithm 4 for cfg."""
    if labels is None:
        return model(z) if x_t is None else model(z, x_t)
    labels = labels.to(z.device)
    if settings.guidance == "cfg":
        from ..guidance.cfg import cfg_logits

        return cfg_logits(model, z, labels, settings.cfg_scale, x_t)
    return model(z, x_t, labels=labels)


def model_dtype(model) -> torch.dtype:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _position_temperature(temperature, seq_len: int):
    if isinstance(temperature, (list, tuple)):
        if len(temperature) != seq_len:
            raise ValueError(f"per-position temperature has {len(temperature)} entries, expected seq_len {seq_len}")
        return torch.tensor(temperature, dtype=torch.float32)
    return float(temperature)


def decode_step(logits: torch.Tensor, u: torch.Tensor, temperature, top_p: float,
                banned: Optional[torch.Tensor] = None, k: int = DEFAULT_K) -> torch.Tensor:
    """Sample every position of logits [B, T, V] in parallel; u [B, T] uniforms -> ids [B, T]."""
    B, T, V = logits.shape
    lg = apply_temperature(logits, temperature, banned)
    return sample_top_p(lg.reshape(B * T, V), u.reshape(-1), top_p, k=k).reshape(B, T)


@torch.no_grad()
def sample_onestep(model, meta: dict, indices: Sequence[int], settings: SampleSettings, *,
                   batch_size: int = 32, device="cpu", vocab_limit: Optional[int] = None,
                   progress=None) -> torch.Tensor:
    """Draw samples ``indices`` from a one-step generator ``model(z) -> logits``; returns ids [N, T]
    (on CPU). ``meta`` needs seq_len, latent_dim, vocab_size."""
    temp = _position_temperature(settings.temperature, int(meta["seq_len"]))
    banned = banned_ids(meta, vocab_limit, device)

    def batch(z, gens, labels):
        logits = guided_logits(model, z, labels, settings)  # [B, T, V]: T = z's positions x stage_a.patch
        u = draw_uniforms(gens, logits.shape[1])
        return decode_step(logits, u, temp, settings.top_p, banned, settings.top_k_prefilter)

    return sample_batches(batch, model, meta, indices, settings, batch_size, device, progress)


def sample_batches(sample_batch, model, meta: dict, indices: Sequence[int], settings: SampleSettings,
                   batch_size: int, device, progress=None) -> torch.Tensor:
    """The batching every sampler shares: per batch of ``indices``, each sample's generator draws
    its latent z [B, T / patch, d] first (``meta["patch"]``: tokens per latent position, default 1),
    then ``sample_batch(z, generators, labels) -> ids [B, T]`` (labels [B]: ``sample_labels``, None
    for an unconditional export); ids [N, T] on CPU."""
    n_classes = check_guidance(meta, settings)
    T, d = int(meta["seq_len"]), int(meta["latent_dim"])
    P = T // int(meta.get("patch") or 1)
    out = []
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        gens = [sample_generator(settings.seed, i) for i in idx]
        z = draw_latents(gens, P, d, settings.latent_scale).to(device, model_dtype(model))
        out.append(sample_batch(z, gens, sample_labels(idx, settings, n_classes)).cpu())
        if progress is not None:
            progress(len(idx))
    if not out:
        return torch.empty((0, T), dtype=torch.long)
    return torch.cat(out)

"""Samples as records, from an exported generator: what ``sample`` writes and ``evaluate`` sweeps.

``load_export`` loads ``config.json`` + ``model.safetensors`` with ``models.generator`` (torch +
safetensors only: no DeepSpeed / megatron-core on sampling machines); ``generate_records`` draws
samples ``indices`` (each sample's randomness is a function of (seed, index), ``sampling.onestep``)
and turns them into JSON-ready records::

    {"index": 0, "text": "...", "ids": [...], "eos": true, "all_ids": [...], "settings": {...}}

``ids`` are the generator token ids before the first end-of-sequence token and ``text`` is their
decoding with the data tokenizer; ``eos`` says whether an EOS was generated at all; ``all_ids``
are all T generated ids (what the paper's evaluation protocol decodes and counts). Records of a
class-conditional export (meta ``num_classes`` > 0) also carry ``"label"``: the sample's class
(``onestep.sample_labels``).

Both kinds of export may carry a compact vocabulary (``data.vocab: corpus``): the sampler
(``p2_self.sample_any``) maps the head's rows back to tokenizer ids, so records never see them.

``load_export(path, kind="stage_a")`` loads a Stage A export as a one-step generator instead:
z -> inverse flow -> Stage A decoder (``models.stage_a.PriorDecoder``), the paper's flow-reverse
diagnostic (``sample.kind=stage_a``).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from ..components.logging import progress
from .onestep import SampleSettings, sample_labels
from .p2_self import sample_any


def load_stage_a_sampler(path: str, device="cpu"):
    """(PriorDecoder, meta) from a Stage A export: sampled like a one-step generator."""
    from ..models.stage_a import PriorDecoder
    from ..models.stage_a_export import load_stage_a

    stage_a, art = load_stage_a(path, device=str(device))
    tok = art.get("tokenizer") or {}
    eos = tok.get("eos_id")
    if eos is None and not tok.get("fixed_length"):  # fixed-length domains (binary images) have no EOS
        raise ValueError(f"Stage A export '{path}': config.json names no tokenizer eos_id")
    meta = {"kind": "stage_a", "seq_len": int(art["seq_len"]), "latent_dim": int(art["latent_dim"]),
            "vocab_size": int(art["vocab_size"]), "eos_id": None if eos is None else int(eos),
            "pad_id": tok.get("pad_id", eos), "tokenizer": tok, "vocab": art.get("vocab"),  # compact ids: sample_any maps back
            "num_classes": stage_a.num_classes}
    if stage_a.patch > 1:
        meta["patch"] = stage_a.patch
    return PriorDecoder(stage_a).eval(), meta


def load_export(path: str, device="cpu", kind: str = "generator"):
    """(model in eval mode, meta) from an export directory, with a clear error when it is missing."""
    if kind == "stage_a":
        return load_stage_a_sampler(path, device)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no exported generator at '{path}' (expected config.json + model.safetensors; "
                                f"run stage_b first or set sample.export)")
    from ..models.generator import load_generator

    model, meta = load_generator(path, device=str(device))
    model.eval()
    for key in ("seq_len", "latent_dim", "vocab_size", "eos_id"):
        if key not in meta:
            raise ValueError(f"export '{path}': config.json meta lacks '{key}'")
    return model, meta


def tokenizer_ref(meta: dict, cfg=None) -> str:
    ref = meta.get("tokenizer")
    if isinstance(ref, dict):
        ref = ref.get("name")
    if not ref:
        if cfg is None:
            raise ValueError("export meta names no tokenizer and no config was given")
        ref = cfg.data.tokenizer
    return ref


def settings_from_cfg(cfg, **over) -> SampleSettings:
    s = cfg.sample
    temperature = s.step_temperatures if (s.step_temperatures and s.steps > 1) else s.temperature
    kw = dict(temperature=temperature, top_p=s.top_p, latent_scale=s.latent_scale, steps=s.steps, eta=s.eta,
              kappa=s.kappa, proposal_top_p=s.proposal_top_p, seed=s.seed, guidance=s.guidance,
              cfg_scale=s.cfg_scale, label=s.label)
    kw.update(over)
    return SampleSettings(**kw)


def truncate_at_eos(ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    ids = [int(i) for i in ids]
    if eos_id in ids:
        return ids[:ids.index(eos_id)], True
    return ids, False


def to_records(ids: torch.Tensor, indices: Sequence[int], tok, eos_id: int, settings: SampleSettings) -> list[dict]:
    recs = []
    sdict = settings.to_dict()
    for row, index in zip(ids.tolist(), indices):
        kept, eos = truncate_at_eos(row, eos_id)
        recs.append({"index": int(index), "text": tok.decode(kept, skip_special_tokens=False), "ids": kept,
                     "eos": eos, "all_ids": [int(i) for i in row], "settings": sdict})
    return recs


def generate_records(model, meta: dict, tok, indices: Sequence[int], settings: SampleSettings, *,
                     batch_size: int, device="cpu", show_progress: bool = False) -> list[dict]:
    """``tok``: the data tokenizer, or a domain's sample codec (``domains``: ``len()`` = the ids a
    sample may hold, ``to_records(ids, indices, settings)`` = its own record format)."""
    bar = progress(total=len(indices), desc="sample", enabled=show_progress) if show_progress else None
    ids = sample_any(model, meta, list(indices), settings, batch_size=batch_size, device=device,
                     vocab_limit=len(tok), progress=(bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    recs = (tok.to_records(ids, indices, settings) if hasattr(tok, "to_records")
            else to_records(ids, indices, tok, int(meta["eos_id"]), settings))
    labels = sample_labels(list(indices), settings, int(meta.get("num_classes") or 0))
    if labels is not None:  # the class each sample was drawn for
        for rec, label in zip(recs, labels.tolist()):
            rec["label"] = int(label)
    return recs

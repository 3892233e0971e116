"""The frozen Stage A artifact: ``model.safetensors`` + ``config.json``, loadable without DeepSpeed.

``config.json`` holds everything needed to rebuild the model and to check that it fits a shard
set: the StageAConfig, feature_dim, vocab_size, seq_len, the encoder and tokenizer identities, and
the feature normalisation statistics (also present as buffers in the weights), and ``num_classes``
(> 0: the flow is class-conditional; absent in older exports: 0). The directory is
written to a temp sibling and renamed into place, so a reader never sees a half-written artifact.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

from safetensors.torch import load_file, save_file

from ..components.atomic import write_dir
from ..config import StageAConfig, section_from_dict
from .stage_a import StageAModel

FORMAT = "coupling_dist.stage_a/1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def export_stage_a(model: StageAModel, out_dir: str, meta: Optional[dict] = None,
                   state_dict: Optional[dict] = None) -> str:
    """Write the artifact atomically. ``meta`` carries encoder/tokenizer identity, seq_len, ...;
    ``state_dict`` may be passed when the live model's parameters are partitioned (ZeRO-3)."""
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    cfg = dataclasses.asdict(model.cfg)
    config = dict(meta or {})
    config.update(format=FORMAT, stage_a=cfg, feature_dim=model.feature_dim, vocab_size=model.vocab_size,
                  latent_dim=model.latent_dim, num_classes=model.num_classes,
                  feature_stats={"mean": tensors["feat_mean"].tolist(), "std": tensors["feat_std"].tolist(),
                                 "set": bool(tensors["feat_stats_set"].item())})

    def write(tmp: str) -> None:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)

    return write_dir(out_dir, write)


def read_meta(art_dir: str) -> dict:
    path = os.path.join(art_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Stage A artifact not found: {path} is missing "
                                f"(run `python -m coupling_dist.stage_a` first, which exports it)")
    with open(path, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def artifact_hash(art_dir: str) -> str:
    """sha256 over the weights and config bytes: what downstream manifests record."""
    h = hashlib.sha256()
    for f in (CONFIG, WEIGHTS):
        h.update(f.encode() + b"\0")
        with open(os.path.join(art_dir, f), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_stage_a(art_dir: str, device="cpu") -> tuple[StageAModel, dict]:
    """Rebuild the frozen model (eval mode, no grads) and return it with its config.json dict."""
    meta = read_meta(art_dir)
    wpath = os.path.join(art_dir, WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"Stage A artifact incomplete: {wpath} is missing")
    cfg = section_from_dict(StageAConfig, meta["stage_a"], "stage_a", os.path.join(art_dir, CONFIG))
    # exports from before class conditioning carry no num_classes: unconditional
    model = StageAModel(int(meta["feature_dim"]), int(meta["vocab_size"]), cfg, int(meta.get("num_classes", 0)))
    state = load_file(wpath, device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{wpath}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta

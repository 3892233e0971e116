"""What preprocessing will write: the settings that determine the bytes, the split, the shard plan.

1. Settings that determine the bytes (corpus content hash, tokenizer/encoder identity, layer,
   dtype, seq_len, shard_size, split, max_samples, and whether the features are left to Stage A:
   ``stage_a.online_encoder``) are hashed into the set *fingerprint*. An
   output dir holding another fingerprint is refused (naming the differing settings) rather than
   mixed or overwritten.
2. The split is deterministic and independent of ``run.seed``: ``round(N * heldout_fraction)``
   indices chosen by a fixed-seed permutation are ``heldout``, the rest ``train``. Each split is
   cut, in corpus order, into shards of ``data.shard_size`` samples; key = global corpus index;
   each planned shard has its own fingerprint (the unit fingerprint of ``data.shard_job``).
3. ``iter_tasks`` makes the pending shards' tasks in one corpus pass.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterator, Optional

import numpy as np

from ...components import assets
from ...components.preflight import PreflightError
from ...config import Config, ConfigError
from ...data import corpus as C
from ...data.source import PAD_FEATURES
from ...data import shards as S
from ...data.shard_job import fingerprint as unit_fingerprint
from ...domains import build_domain

SPLIT_SEED = 20240601  # fixed: the data split must not change with the training seed


class PreprocessError(RuntimeError):
    pass


class OtherShardSetError(PreprocessError, PreflightError):
    """The output directory holds shards made with other settings (refused before any work)."""


# --------------------------------------------------------------------------- settings + plan


def encoder_info(model_ref: Optional[str], layer: int, dtype: str, tok_vocab: int) -> dict:
    """Identity and shape of the frozen encoder, validated before any work."""
    if model_ref is None:
        return {"name": None, "hash": None}
    conf = assets.load_config(model_ref)
    hidden = getattr(conf, "hidden_size", None) or getattr(conf, "n_embd", None)
    layers = getattr(conf, "num_hidden_layers", None) or getattr(conf, "n_layer", None)
    if not -(layers + 1) <= layer <= layers:
        raise ConfigError(f"'encoder.layer' = {layer} is out of range for {model_ref!r} "
                          f"({layers} layers: hidden_states has {layers + 1} entries)")
    vocab = getattr(conf, "vocab_size", None)
    if vocab is not None and vocab < tok_vocab:
        raise ConfigError(f"'encoder.model' {model_ref!r} has vocab_size {vocab}, smaller than the "
                          f"tokenizer's {tok_vocab} ('data.tokenizer'): ids would be out of range")
    ident = assets.identity(model_ref)
    return dict(ident, layer=layer, dtype=dtype, hidden_size=int(hidden), num_layers=int(layers),
                model_type=getattr(conf, "model_type", None), pad_features=PAD_FEATURES)


def build_settings(cfg: Config) -> dict:
    d = cfg.data
    domain = build_domain(cfg)
    try:
        files = domain.corpus_files()
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"'data.corpus' = {d.corpus!r}: {e}") from None
    try:
        tok = domain.tokenizer_identity()
    except (OSError, ValueError) as e:
        raise ConfigError(f"'data.tokenizer' = {d.tokenizer!r} cannot be loaded: {e}") from None
    enc = encoder_info(cfg.encoder.model, cfg.encoder.layer, cfg.encoder.dtype, tok["vocab_size"])
    settings = {"corpus": C.files_identity(files), "files": files, "format": d.format, "text_field": d.text_field,
                "tokenizer": tok, "encoder": enc, "seq_len": d.seq_len, "shard_size": d.shard_size,
                "heldout_fraction": d.heldout_fraction, "max_samples": d.max_samples, "split_seed": SPLIT_SEED,
                **domain.settings_extra()}
    if cfg.stage_a.online_encoder:  # only then: shard sets with stored features keep their fingerprints
        settings["online_features"] = True
    return settings


def fingerprint(settings: dict) -> str:
    ident = {k: v for k, v in settings.items() if k != "files"}  # paths may move; content may not
    for k in ("tokenizer", "encoder"):  # a name is not identity: the same files under another path are fine
        ident[k] = {kk: vv for kk, vv in ident[k].items() if kk != "name"}
    return unit_fingerprint(ident)


def heldout_mask(n: int, fraction: float) -> np.ndarray:
    n_held = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(SPLIT_SEED).permutation(n)[:n_held]] = True
    return mask


def make_plan(n: int, fraction: float, shard_size: int, set_fp: str) -> tuple[list[dict], np.ndarray]:
    """Shards of each split in corpus order: [{name, split, count, first_key, last_key, fingerprint}]."""
    held = heldout_mask(n, fraction)
    plan = []
    for split, sel in (("train", ~held), ("heldout", held)):
        idx = np.flatnonzero(sel)
        for j in range(math.ceil(len(idx) / shard_size)):
            part = idx[j * shard_size:(j + 1) * shard_size]
            e = {"name": S.shard_name(split, j), "split": split, "count": int(len(part)),
                 "first_key": f"{int(part[0]):09d}", "last_key": f"{int(part[-1]):09d}"}
            e["fingerprint"] = unit_fingerprint([set_fp, e])
            plan.append(e)
    return plan, held


def check_existing(out_dir: str, set_fp: str, settings: dict) -> None:
    """Refuse an output dir made with other settings (never mix two shard sets)."""
    path = S.Manifest.path(out_dir)
    if not os.path.isfile(path):
        return
    old = S.Manifest.load(out_dir).to_dict()
    if old.get("kind") != "preprocess" or old.get("fingerprint") == set_fp:
        if old.get("kind") != "preprocess":
            raise OtherShardSetError(f"{path}: holds a '{old.get('kind')}' shard set, not preprocess output; "
                                     f"choose another data.out_dir")
        return
    prev = old.get("settings") or {}
    diff = sorted(k for k in settings if k != "files" and json.dumps(prev.get(k), sort_keys=True)
                  != json.dumps(settings[k], sort_keys=True))
    raise OtherShardSetError(f"{path}: this directory holds shards made with other settings (differing: "
                             f"{diff or ['fingerprint']}); finished shards are never rewritten, so point "
                             f"data.out_dir elsewhere or delete the directory")


def iter_tasks(files: list[str], cfg: Config, held: np.ndarray, plan: list[dict], pending: set) -> Iterator[dict]:
    """One corpus pass; yields the pending shards' tasks as soon as each is complete."""
    size = cfg.data.shard_size
    by_name = {e["name"]: e for e in plan}
    buf = {"train": ([], []), "heldout": ([], [])}
    count = {"train": 0, "heldout": 0}
    total = {"train": int((~held).sum()), "heldout": int(held.sum())}
    for i, text in enumerate(build_domain(cfg).iter_items(files, limit=len(held))):  # a sentence, a digit, ...
        split = "heldout" if held[i] else "train"
        name = S.shard_name(split, count[split] // size)
        count[split] += 1
        if name in pending:
            buf[split][0].append(f"{i:09d}")
            buf[split][1].append(text)
        if count[split] % size == 0 or count[split] == total[split]:  # the shard is complete
            if name in pending:
                keys, texts = buf[split]
                e = by_name[name]
                yield {"name": name, "split": split, "keys": keys, "texts": texts, "fingerprint": e["fingerprint"]}
            buf[split] = ([], [])


def count_samples(files: list[str], cfg: Config) -> int:
    return sum(1 for _ in build_domain(cfg).iter_items(files, limit=cfg.data.max_samples))

"""Reward-classifier pre-flight: the domain has a classifier kind, the shard set exists, was made
with this config's domain settings, carries the ``label`` field, and its training items hold at
least two classes in range; otherwise ``PreflightError`` (exit status 2) naming the file and the
fix, before any training."""
from __future__ import annotations

import os

import numpy as np

from ...components.paths import data_dir
from ...components.preflight import PreflightError, require_file
from ...config import Config
from ...data.shards import Manifest, iter_shards
from ...domains.base import Domain

PREPROCESS = "python -m coupling_dist.preprocess --config FILE"


def check_domain(cfg: Config, domain: Domain) -> None:
    if domain.feature_net is None:
        raise PreflightError(f"data.domain {cfg.data.domain!r} has no reward classifier: the classifier kinds are "
                             f"digit2d (binary_image) and seq1d (dna); text labels (data.label_field) serve "
                             f"classifier-free guidance only")


def check_shards(cfg: Config, domain: Domain) -> Manifest:
    """The shard set's manifest, after checking it fits this config and carries labels."""
    src = data_dir(cfg)
    path = os.path.join(src, "manifest.json")
    require_file(path, f"no preprocessed shard set at {src}: run `{PREPROCESS}` first (or set data.out_dir "
                       f"to an existing shard set)")
    man = Manifest.load(src)
    domain.check_tokenizer({"tokenizer": man.tokenizer or {}}, src)
    if "label" not in (man.fields or {}):
        raise PreflightError(f"{path}: the shards have no 'label' field (fields: {sorted(man.fields or {})}); the "
                             f"reward classifier is trained on the items' class labels: re-run `{PREPROCESS}` with "
                             f"a labelled corpus")
    return man


def read_split(cfg: Config, domain: Domain, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64 [N, T] in the classifier's order, i.e. ``domain.feature_tokens``; labels [N])."""
    toks, labels = [], []
    for samples in iter_shards(data_dir(cfg), split, fields=["tokens", "label"]):
        toks += [s["tokens"] for s in samples]
        labels += [int(np.asarray(s["label"]).reshape(-1)[0]) for s in samples]
    if not toks:
        return np.zeros((0, cfg.data.seq_len), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    return domain.feature_tokens(np.stack(toks).astype(np.int64)), np.asarray(labels, dtype=np.int64)


def check_labels(cfg: Config, domain: Domain, labels: np.ndarray, split: str) -> int:
    """The number of classes (``domain.n_classes``, else max label + 1) after checking the labels."""
    where = os.path.join(data_dir(cfg), "manifest.json")
    if split == "train" and len(labels) < 2:
        raise PreflightError(f"{where}: {len(labels)} training item(s); the reward classifier needs at least 2 "
                             f"(a bigger corpus, or a smaller data.heldout_fraction)")
    if not len(labels):
        return 0
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise PreflightError(f"{where}: the {split} items have label {lo}; labels must be ints >= 0")
    if domain.n_classes and hi >= domain.n_classes:
        raise PreflightError(f"{where}: the {split} items have label {hi}, but data.domain {domain.name} has "
                             f"{domain.n_classes} classes (labels 0..{domain.n_classes - 1})")
    if split == "train" and len(np.unique(labels)) < 2:
        raise PreflightError(f"{where}: every one of the {len(labels)} training items has label {lo}; a classifier "
                             f"needs at least 2 classes (label the corpus)")
    return domain.n_classes or hi + 1

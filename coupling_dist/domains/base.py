"""The domain layer: one module per kind of data, so the stages never branch on the domain name.

A domain answers, for the stages that call it:

- preprocess: which files the corpus is (``corpus_files``), the items they hold (``iter_items``:
  a sentence, a digit with its label, ...), how a batch of items becomes fixed-length token rows
  (``item_codec``: what the preprocess worker runs, a picklable object or the tokenizer reference
  for text), the manifest's extra shard fields (``shard_fields``, e.g. a class label) and the
  identity recorded as the shard set's ``tokenizer`` (``tokenizer_identity``: vocabulary size,
  EOS / pad ids or none, the pixel order, ...), which every later stage compares;
- Stage A / the pair store: nothing: they see token rows, and Stage A's encoder is the learned
  token embedding for every domain but text with a frozen LM (``encoder.model``); the latent
  shape comes from ``stage_a.patch`` (tokens per latent position; the domain orders its tokens so
  that a latent position's k tokens are consecutive, e.g. a 4x4 pixel patch);
- Stage B: how many output rows the head has (``head_rows``);
- sample: how drawn ids become records (``sample_codec``) and pictures (``write_pictures``);
- evaluate: which evaluator applies (``metric``: ``gen_ppl`` = the causal-LM scorer;
  ``classifier_frechet`` = the Fréchet distance in a classifier's feature space, with the
  classifier kind ``feature_net`` and the item order it reads, ``feature_tokens``), plus the
  domain's own per-series columns (``extra_metrics`` / ``extra_columns``: DNA's k-mer spectrum and
  GC-content distances) and figures of the table (``write_eval_figures``).

Adding a domain: a module with a ``Domain`` subclass, its name in ``DOMAINS`` and in
``config.DataConfig.domain``'s choices, its corpus asset in ``components/assets.py``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
from typing import Iterator, Optional

import numpy as np


class Domain:
    name = "?"
    metric = "gen_ppl"  # which evaluator stages/evaluate runs (module docstring)
    feature_net: Optional[str] = None  # classifier_frechet: feature_net.build_feature_net kind
    n_classes = 0  # classifier_frechet: label classes of the shards' "label" field (0: max label + 1)
    extra_columns: tuple = ()  # classifier_frechet: the keys ``extra_metrics`` adds to every row
    summary_columns: tuple = ()  # (key, header) of those the pipeline's closing summary prints
    # (label, file in run.dir/eval) of what the evaluation writes: the pipeline's closing summary
    eval_outputs = (("metrics table", "results.csv"), ("frontier plot", "frontier.png"))

    def __init__(self, cfg):
        self.cfg = cfg

    # ------------------------------------------------------------------ preprocess
    def check_config(self) -> None:
        """Refuse config values this domain cannot work with (``ConfigError`` naming the key)."""

    def corpus_files(self) -> list[str]:
        from ..components.assets import resolve_corpus

        return resolve_corpus(self.cfg.data.corpus)

    def tokenizer_identity(self) -> dict:
        raise NotImplementedError

    def settings_extra(self) -> dict:
        """Settings beyond the shared ones that determine the shard bytes (in the set fingerprint)."""
        return {}

    def iter_items(self, files: list[str], limit: Optional[int] = None) -> Iterator:
        raise NotImplementedError

    def item_codec(self):
        """What ``stages/preprocess/worker.ShardWorker`` turns items into token rows with: an object
        with ``encode_items(items) -> (tokens int32 [B, T], mask uint8 [B, T], #truncated, fields)``."""
        raise NotImplementedError

    def shard_fields(self) -> dict:
        """Manifest specs of the extra per-sample fields the codec writes ({} for text)."""
        return {}

    def check_tokenizer(self, info: dict, data_dir: str) -> None:
        """The shards (``data.source.describe_source`` info) must come from this domain's settings."""
        from ..data.source import DataMismatchError

        have, want = info["tokenizer"], self.tokenizer_identity()
        if have.get("hash") and have["hash"] != want["hash"]:
            raise DataMismatchError(f"{data_dir}/manifest.json: the shards were made as {have.get('name')!r} (hash "
                                    f"{have['hash']}) but this config makes {want.get('name')!r} (hash {want['hash']}); "
                                    f"rerun preprocess into a new data.out_dir or fix data.domain / stage_a.patch")

    # ------------------------------------------------------------------ Stage B
    def head_rows(self, n: int, tp: int) -> int:
        """Output rows of a Stage B head that must hold ``n`` ids, at tensor-parallel size ``tp``."""
        m = math.lcm(1024, 128 * tp)  # the TP-size-independent layout (distributed.tp_reshape)
        return int(math.ceil(n / m) * m)

    # ------------------------------------------------------------------ sample / evaluate
    def sample_codec(self, meta: dict):
        """What ``sampling.generate.generate_records`` writes records with (the data tokenizer for text)."""
        raise NotImplementedError

    def write_pictures(self, samples_path: str, out_dir: str) -> list[str]:
        """Pictures of a samples file (and of real data) into ``out_dir``; returns their paths."""
        return []

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer_identity()["vocab_size"])

    # ------------------------------------------------------------------ classifier_frechet evaluation
    def feature_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Token rows [N, T] (model order) in the order the evaluation classifier reads."""
        return tokens

    def sample_file_tokens(self, path: str) -> np.ndarray:
        """A samples file's rows [N, T] in the classifier's order."""
        raise NotImplementedError

    def inception_images(self, tokens: np.ndarray):
        """Images [N, H, W] for the standard Inception FID, or None (not images)."""
        return None

    def write_grid(self, tokens: np.ndarray, path: str, cols: int = 8) -> None:
        """A picture of rows in the classifier's order, ``cols`` per row (nothing by default)."""

    def extra_metrics(self, tokens: np.ndarray, reference: np.ndarray) -> dict:
        """Metrics of one evaluated series beyond the Fréchet distance ({column: value} with the keys
        of ``extra_columns``); ``tokens`` and ``reference`` in the classifier's order."""
        return {}

    def write_eval_figures(self, rows: list[dict], out_dir: str) -> list[str]:
        """Figures of the evaluation's rows into ``out_dir`` (none by default); returns their paths."""
        return []


class LabelledCodecDomain(Domain):
    """A fixed-length domain over a small alphabet whose items carry a class label (binary images,
    DNA): one codec (``self.codec``, set by the subclass) makes the token rows at preprocess time
    and the records at sample time, the label is the shard field ``label``, and the heads need no
    1024-row layout."""
    codec = None
    # the words of the shared refusals (check_config): the encoder Stage A learns, what no teacher LM
    # exists for, and why a compact vocabulary has nothing to do
    learned_encoder = "token"
    no_teacher_for = "this domain"
    alphabet_note = "a handful of ids"

    def check_config(self) -> None:
        """Refusals every labelled small-alphabet domain shares (``ConfigError`` naming the key);
        subclasses check their own keys first, then call this."""
        from ..config import ConfigError

        c, n = self.cfg, self.name
        if c.encoder.model is not None:
            raise ConfigError(f"'encoder.model' must be null for data.domain {n} (Stage A learns the "
                              f"{self.learned_encoder} encoder, as the paper does)")
        if c.stage_b.kd.teacher is not None:
            raise ConfigError(f"'stage_b.kd.teacher' must be null for data.domain {n} (no teacher LM for "
                              f"{self.no_teacher_for})")
        if c.data.vocab != "full":
            raise ConfigError(f"'data.vocab' must be full for data.domain {n} ({self.alphabet_note}: nothing to compact)")

    @staticmethod
    def hashed_identity(ident: dict) -> dict:
        """``ident`` with its ``hash`` (sha256 of its sorted JSON, 16 hex digits): what the shards record."""
        ident["hash"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return ident

    def item_codec(self):
        return self.codec

    def sample_codec(self, meta: dict):
        return self.codec

    def shard_fields(self) -> dict:
        return {"label": {"dtype": "int16", "shape": [1]}}

    def head_rows(self, n: int, tp: int) -> int:
        m = math.lcm(8, tp)  # a handful of ids: no need for the text heads' 1024-row layout
        return int(math.ceil(n / m) * m)


# data.domain -> "module:class" (imported on demand: text never loads the image code and back)
DOMAINS = {"text": ".text:TextDomain", "binary_image": ".binary_image:BinaryImageDomain", "dna": ".dna:DnaDomain"}


def build_domain(cfg) -> Domain:
    """The ``Domain`` of ``data.domain`` (validated against the config)."""
    from ..config import ConfigError

    name = cfg.data.domain
    if name not in DOMAINS:
        raise ConfigError(f"'data.domain' = {name!r} is not built yet (built: {sorted(DOMAINS)})")
    module, cls = DOMAINS[name].split(":")
    dom = getattr(importlib.import_module(module, __package__), cls)(cfg)
    dom.check_config()
    return dom

"""Text: a sample is a sentence, tokenized with ``data.tokenizer``, EOS appended, padded or cut to
``data.seq_len`` (pad = the tokenizer's pad id); Stage A reads frozen-LM features
(``encoder.model``) or learns a token embedding (``encoder.model: null``); samples are decoded
text; the evaluation scores them with a causal LM (Gen-PPL, entropy: ``stages/evaluate``).

Labelled text (``data.label_field``: a JSONL field / Parquet column of int class labels): the items
are (sentence, label) pairs and the shards gain the field ``label`` (int16 [1]), as binary images
and DNA have; the field name joins the shard set's settings. Unlabelled (null, the default), the
items, the codec and so the shards are exactly what they were before the option existed."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from ..components import assets
from ..data import corpus as C
from .base import Domain


class TextCodec:
    """Sentences -> token rows: ids + EOS, then truncated / padded to ``seq_len``."""

    def __init__(self, tokenizer_ref: str, seq_len: int):
        self.tok = assets.load_tokenizer(tokenizer_ref)
        self.seq_len = int(seq_len)
        self.eos, self.pad = int(self.tok.eos_token_id), int(self.tok.pad_token_id)

    def encode_items(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int, dict]:
        """(tokens int32 [B, T], mask uint8 [B, T], #truncated, no extra fields)."""
        T = self.seq_len
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        tokens = np.full((len(texts), T), self.pad, dtype=np.int32)
        mask = np.zeros((len(texts), T), dtype=np.uint8)
        truncated = 0
        for i, row in enumerate(ids):
            row = list(row) + [self.eos]
            truncated += len(row) > T
            row = row[:T]
            tokens[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return tokens, mask, truncated, {}


class LabelledTextCodec:
    """(sentence, label) items -> ``TextCodec``'s rows + the shard field ``label`` (int16 [B, 1]). It
    ships as the tokenizer reference (a tokenizer object is heavy to pickle) and loads it on first use
    in the preprocess worker."""

    def __init__(self, tokenizer_ref: str, seq_len: int):
        self.tokenizer_ref, self.seq_len = tokenizer_ref, int(seq_len)
        self._codec = None

    def __getstate__(self) -> dict:
        return {"tokenizer_ref": self.tokenizer_ref, "seq_len": self.seq_len, "_codec": None}

    def encode_items(self, items: list) -> tuple[np.ndarray, np.ndarray, int, dict]:
        if self._codec is None:
            self._codec = TextCodec(self.tokenizer_ref, self.seq_len)
        tokens, mask, truncated, _ = self._codec.encode_items([text for text, _ in items])
        return tokens, mask, truncated, {"label": np.array([[lab] for _, lab in items], dtype=np.int16)}


class TextDomain(Domain):
    name = "text"
    metric = "gen_ppl"

    def tokenizer_identity(self) -> dict:
        return assets.tokenizer_identity(self.cfg.data.tokenizer)

    def check_tokenizer(self, info: dict, data_dir: str) -> None:
        from ..data.source import check_tokenizer

        check_tokenizer(self.cfg.data.tokenizer, info, data_dir)

    def iter_items(self, files: list[str], limit: Optional[int] = None) -> Iterator:
        d = self.cfg.data
        return C.iter_corpus(files, d.format, d.text_field, limit=limit, label_field=d.label_field)

    def item_codec(self):
        if self.cfg.data.label_field is not None:
            return LabelledTextCodec(self.cfg.data.tokenizer, self.cfg.data.seq_len)
        # the tokenizer reference: the worker loads it itself (a tokenizer object is heavy to ship)
        return self.cfg.data.tokenizer

    def shard_fields(self) -> dict:
        return {"label": {"dtype": "int16", "shape": [1]}} if self.cfg.data.label_field is not None else {}

    def settings_extra(self) -> dict:
        # only when set: an unlabelled shard set keeps its fingerprint
        return {"label_field": self.cfg.data.label_field} if self.cfg.data.label_field is not None else {}

    def sample_codec(self, meta: dict):
        from ..sampling.generate import tokenizer_ref

        return assets.load_tokenizer(tokenizer_ref(meta, self.cfg))

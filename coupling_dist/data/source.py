"""What the stages downstream of preprocessing need from a preprocessed shard set, with clear errors.

``describe_source`` reads a manifest into the facts Stage A and the pair store check (seq_len,
vocabulary, tokenizer and encoder identity, feature width); ``check_tokenizer`` refuses shards made
with another tokenizer than the config names. Mismatches raise ``DataMismatchError``, a
``PreflightError`` (exit status 2 before any work).
"""
from __future__ import annotations

import os

from ..components.preflight import PreflightError


# How features at pad positions are made (recorded in the manifest's encoder identity): the frozen
# LM reads the whole padded sequence -- the text, its EOS, then pad ids (= EOS for Qwen and
# SmolLM2) -- with full attention, so a pad position holds the LM's state "after the sentence
# ended". Stage A encodes all T positions (the paper's Algorithm 1), so what it sees at pads must
# be a real, deterministic function of the sequence: the length then lives in z. (Shards from
# before this recorded no value: their pads were zeroed.)
PAD_FEATURES = "full_attention"


class DataMismatchError(PreflightError):
    """The shard set does not fit (missing features, other tokenizer, other width)."""


def describe_source(man, data_dir: str) -> dict:
    where = os.path.join(data_dir, "manifest.json")
    d = man if isinstance(man, dict) else man.to_dict()
    fields = d.get("fields") or {}
    feat = fields.get("features")
    tok = d.get("tokenizer") or {}
    seq_len = d.get("seq_len")
    if seq_len is None:
        raise DataMismatchError(f"{where}: manifest has no 'seq_len'")
    vocab = tok.get("vocab_size") or d.get("vocab_size")
    if vocab is None:
        raise DataMismatchError(f"{where}: manifest has no tokenizer vocab_size")
    return {"seq_len": int(seq_len), "vocab_size": int(vocab), "tokenizer": tok,
            "encoder": d.get("encoder") or {}, "feature_dim": int(feat["shape"][-1]) if feat else None,
            "feature_dtype": (feat or {}).get("dtype")}


# Every key of the manifest's encoder record but its name determines the features (a name is not
# identity: the same files under another path make the same features).
ENCODER_NAME_KEYS = ("name",)


def encoder_differences(a: dict, b: dict) -> list[str]:
    """The keys (name excluded) whose values differ between two encoder records, e.g. a Stage A
    export's ``encoder`` and the shards' manifest ``encoder``: hash, layer, dtype, width, pad_features."""
    a, b = a or {}, b or {}
    keys = sorted((set(a) | set(b)) - set(ENCODER_NAME_KEYS))
    return [k for k in keys if a.get(k) != b.get(k)]


def describe_encoder(enc: dict, keys=None) -> str:
    """``'tiny:qwen2' (hash 1234, layer -1, ...)``: the name and the given (default: all) identity keys."""
    enc = enc or {}
    keys = keys if keys is not None else sorted(set(enc) - set(ENCODER_NAME_KEYS))
    return f"{enc.get('name')!r} (" + ", ".join(f"{k} {enc.get(k)!r}" for k in keys) + ")"


def check_tokenizer(tokenizer_ref: str, info: dict, data_dir: str) -> None:
    """The shards must have been made with the tokenizer ``data.tokenizer`` names."""
    from ..components import assets

    want = assets.tokenizer_identity(tokenizer_ref)
    have = info["tokenizer"]
    if have.get("hash") and have["hash"] != want["hash"]:
        raise DataMismatchError(
            f"{os.path.join(data_dir, 'manifest.json')}: shards were tokenized with {have.get('name')!r} "
            f"(vocab hash {have['hash']}) but data.tokenizer is {tokenizer_ref!r} (hash {want['hash']}); "
            f"rerun preprocess or fix data.tokenizer")

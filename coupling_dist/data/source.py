"""What the stages downstream of preprocessing need from a preprocessed shard set, with clear errors.

``describe_source`` reads a manifest into the facts Stage A and the pair store check (seq_len,
vocabulary, tokenizer and encoder identity, feature width -- of stored features, or of those the
stages compute per batch from token-only shards: ``online_features``); ``check_tokenizer`` refuses
shards made with another tokenizer than the config names; ``check_feature_source`` and
``check_online_encoder`` refuse a ``stage_a.online_encoder`` setting or an encoder that does not
fit the shards. Mismatches raise ``DataMismatchError``, a
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
    online = d.get("online_features")  # tokens only: the stages compute these (stage_a.online_encoder)
    feat = feat or online
    return {"seq_len": int(seq_len), "vocab_size": int(vocab), "tokenizer": tok,
            "encoder": d.get("encoder") or {}, "feature_dim": int(feat["shape"][-1]) if feat else None,
            "feature_dtype": (feat or {}).get("dtype"), "online_features": bool(online)}


def check_feature_source(online_encoder: bool, info: dict, data_dir: str) -> None:
    """Shards with stored features need ``stage_a.online_encoder: false``; shards preprocessed
    with it true (tokens only, features computed per batch) need it true."""
    where = os.path.join(data_dir, "manifest.json")
    if info["online_features"] and not online_encoder:
        raise DataMismatchError(f"{where}: these shards hold tokens only (preprocessed with "
                                f"stage_a.online_encoder: true; the frozen encoder runs per batch), but "
                                f"stage_a.online_encoder is false: set it true, or rerun preprocess with it "
                                f"false into another data.out_dir to store the features")
    if online_encoder and not info["online_features"]:
        held = "stored encoder features" if info["feature_dim"] else "no encoder record (encoder.model: null)"
        raise DataMismatchError(f"{where}: stage_a.online_encoder is true but these shards hold {held}: "
                                f"set stage_a.online_encoder false to use them, or rerun preprocess with "
                                f"stage_a.online_encoder: true into another data.out_dir")


def check_online_encoder(enc_cfg, info: dict, data_dir: str) -> None:
    """The encoder the config would run online (``enc_cfg``: the ``encoder`` section) must be the
    one the shards' manifest records: model identity (hash), layer and dtype; else the features
    would not be the ones the shard set describes."""
    from ..components import assets

    rec = info["encoder"] or {}
    want = {"hash": assets.identity(enc_cfg.model)["hash"], "layer": enc_cfg.layer, "dtype": enc_cfg.dtype}
    keys = {"hash": "encoder.model", "layer": "encoder.layer", "dtype": "encoder.dtype"}
    bad = [k for k in want if rec.get(k) != want[k]]
    if bad:
        raise DataMismatchError(
            f"{os.path.join(data_dir, 'manifest.json')}: the shards were preprocessed for online features of "
            f"{describe_encoder(rec, bad)}, but the config's " + ", ".join(
                f"{keys[k]} gives {k} {want[k]!r}" for k in bad) + " (encoder.model "
            f"{enc_cfg.model!r}); fix the encoder section or rerun preprocess")


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

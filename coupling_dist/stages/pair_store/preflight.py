"""Pair-store pre-flight: everything a rank needs, validated before any work (pure reads, so every
rank -- and the Ray driver -- may call ``prepare``). The Stage A artifact must fit the source shards
(tokenizer, seq_len, feature width, the full encoder identity, vocabulary); otherwise ``PreflightError`` names both
sides. Token-only shards preprocessed under ``stage_a.online_encoder`` record the same encoder identity as
stored features would, so an artifact trained either way fits either kind of shard set; with
token-only shards the ranks compute the features per batch (``online``), after checking that the
config's ``encoder`` section is the one the shards record."""
from __future__ import annotations

import os
from typing import Optional

from ...components import assets
from ...components.paths import data_dir, pair_store_dir, stage_a_artifact
from ...components.preflight import PreflightError, check_export, require_labels, teacher_path
from ...config import Config
from ...data.shard_job import fingerprint
from ...data.source import (DataMismatchError, check_feature_source, check_online_encoder, describe_encoder,
                            describe_source, encoder_differences)
from ...models.stage_a_export import artifact_hash, read_meta
from ...models.teacher import cache_record


def check_artifact(meta: dict, info: dict, art: str, src_dir: str) -> None:
    """Refuse an artifact made for other shards, naming both sides."""
    src = os.path.join(src_dir, "manifest.json")
    problems = []
    a_tok, s_tok = meta.get("tokenizer") or {}, info["tokenizer"]
    if a_tok.get("hash") != s_tok.get("hash"):
        problems.append(f"tokenizer: artifact {a_tok.get('name')!r} (hash {a_tok.get('hash')}) vs shards "
                        f"{s_tok.get('name')!r} (hash {s_tok.get('hash')})")
    if int(meta.get("seq_len", -1)) != info["seq_len"]:
        problems.append(f"seq_len: artifact {meta.get('seq_len')} vs shards {info['seq_len']}")
    if int(meta.get("feature_dim", -1)) != (info["feature_dim"] or 0):  # 0: token-embedding encoder
        problems.append(f"feature width: artifact {meta.get('feature_dim')} vs shards {info['feature_dim']}")
    # the same width is not the same features: another encoder, layer, dtype or pad handling makes
    # latents the decoder was never trained on
    a_enc, s_enc = meta.get("encoder") or {}, info["encoder"] or {}
    differing = encoder_differences(a_enc, s_enc)
    if differing:
        shown = ["hash"] + [k for k in differing if k != "hash"]
        problems.append(f"encoder: artifact {describe_encoder(a_enc, shown)} vs shards "
                        f"{describe_encoder(s_enc, shown)} (differing: {', '.join(differing)})")
    if meta.get("feature_dtype") and info["feature_dtype"] and meta["feature_dtype"] != info["feature_dtype"]:
        problems.append(f"feature dtype: artifact {meta['feature_dtype']} vs shards {info['feature_dtype']}")
    # a compact-vocabulary artifact's head is smaller than the tokenizer: compare tokenizer sizes
    a_vocab = (meta.get("vocab") or {}).get("full_size", meta.get("vocab_size", -1))
    if int(a_vocab) != info["vocab_size"]:
        problems.append(f"vocab_size: artifact {a_vocab} vs shards {info['vocab_size']}")
    if problems:
        raise DataMismatchError(f"Stage A artifact {art} does not match the source shards {src}: "
                                + "; ".join(problems) + " (re-export Stage A for these shards, or point "
                                "pair_store.artifact / data.out_dir at matching ones)")


def source_plan(man) -> list[dict]:
    """Every source shard (all splits) as {name, split, count, sha256}, in a fixed order."""
    d = man if isinstance(man, dict) else man.to_dict()
    out = []
    for s in d.get("shards", []):
        out.append({"name": os.path.basename(s["name"]), "split": s["split"], "count": int(s["count"]),
                    "sha256": s.get("sha256")})
    return sorted(out, key=lambda e: e["name"])


def prepare(cfg: Config) -> dict:
    """The validated work description every rank shares."""
    try:
        return _prepare(cfg)
    except (FileNotFoundError, ValueError) as e:  # a missing or unreadable artifact / manifest
        raise PreflightError(str(e)) from None


def _prepare(cfg: Config) -> dict:
    from ...data.shards import Manifest

    src_dir, art = data_dir(cfg), stage_a_artifact(cfg)
    check_export(art, "Stage A export", "run `python -m coupling_dist.stage_a` with this config to (re-)export it, "
                 "or point pair_store.artifact at a complete export")
    meta = read_meta(art)
    man = Manifest.load(src_dir)
    info = describe_source(man, src_dir)
    check_artifact(meta, info, art, src_dir)
    check_feature_source(cfg.stage_a.online_encoder, info, src_dir)
    # token-only shards and an artifact that reads features: run the frozen encoder per batch
    online = bool(info["online_features"] and int(meta.get("feature_dim", 0)))
    if online:
        check_online_encoder(cfg.encoder, info, src_dir)
    plan = source_plan(man)
    if not plan:
        raise DataMismatchError(f"{os.path.join(src_dir, 'manifest.json')}: lists no shards")
    ps = cfg.pair_store
    settings = {"seed": cfg.run.seed, "multiplicity": ps.multiplicity, "dtype": ps.dtype, "batch_size": ps.batch_size}
    t_path, cache = teacher_cache(cfg, info, src_dir)
    if cache:  # only then: stores written without a cache keep their fingerprints
        settings["teacher_cache"] = cache
    if online:  # likewise
        settings["online_features"] = True
    n_classes = int(meta.get("num_classes", 0))
    if n_classes:  # likewise: a class-conditional Stage A encodes z = NF(u; y) with the shards' labels
        require_labels(man.fields, os.path.join(src_dir, "manifest.json"), n_classes)
        settings["num_classes"] = n_classes
    src_hash = fingerprint([[e["name"], e.get("count"), e.get("sha256")] for e in plan])
    return {"data_dir": src_dir, "artifact": art, "meta": meta, "info": info, "plan": plan,
            "settings": settings, "artifact_hash": artifact_hash(art), "source_hash": src_hash,
            "out_dir": pair_store_dir(cfg), "teacher_path": t_path, "teacher_cache": cache, "online": online}


def teacher_cache(cfg: Config, info: dict, src_dir: str) -> tuple[Optional[str], Optional[dict]]:
    """(teacher path, the cache record) for ``pair_store.teacher_topk`` > 0, else (None, None). The
    teacher is ``stage_b.kd.teacher``: it must exist, share the shards' tokenizer, have >= k ids."""
    k = cfg.pair_store.teacher_topk
    if not k:
        return None, None
    kd = cfg.stage_b.kd
    if kd.teacher is None:
        raise PreflightError(f"pair_store.teacher_topk = {k} caches the KD teacher, but stage_b.kd.teacher is null")
    path = teacher_path(kd.teacher)
    t_tok, s_tok = assets.tokenizer_identity(path), info["tokenizer"]
    if s_tok.get("hash") and t_tok["hash"] != s_tok["hash"]:
        raise PreflightError(f"pair_store.teacher_topk: stage_b.kd.teacher '{kd.teacher}' uses tokenizer "
                             f"{t_tok['name']!r} (hash {t_tok['hash']}) but the source shards "
                             f"{os.path.join(src_dir, 'manifest.json')} use {s_tok.get('name')!r} (hash "
                             f"{s_tok['hash']}); the teacher's cache needs the same tokenizer")
    from transformers import AutoConfig

    t_vocab = int(AutoConfig.from_pretrained(path, local_files_only=os.path.isdir(path)).vocab_size)
    if k > t_vocab:
        raise PreflightError(f"pair_store.teacher_topk = {k} exceeds the teacher's vocabulary ({t_vocab})")
    return path, cache_record(kd.teacher, path, kd.temperature, k)

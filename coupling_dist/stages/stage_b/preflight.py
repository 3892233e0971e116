"""Stage B pre-flight, before any training: the pair store exists and its latent width equals
``stage_a.latent_dim``; the KD teacher exists and shares the pair store's tokenizer; ``stage_b.tp``
divides the world size, the heads, the FFN and the teacher vocabulary; the global batch splits over
the data-parallel ranks. Every refusal is a ``PreflightError`` (exit status 2) naming the key/path.
``checked_task_info`` returns what the task needs (shapes, vocabulary, teacher, special ids).
"""
from __future__ import annotations

import math
import os

from ...components import assets
from ...components.paths import pair_store_dir
from ...components.preflight import PreflightError, require_file
from ...config import Config
from ...distributed.parallel_state import check_layout


def checked_task_info(cfg: Config, world: int) -> dict:
    check_layout(cfg.stage_b.tp, world)
    info = preflight(cfg)
    if cfg.stage_b.train.batch_size % (world // cfg.stage_b.tp):
        raise PreflightError(f"stage_b.train.batch_size ({cfg.stage_b.train.batch_size}) must be divisible by the "
                             f"data-parallel size {world // cfg.stage_b.tp} (world {world} / stage_b.tp {cfg.stage_b.tp})")
    return info


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def _teacher_path(ref: str) -> str:
    path = assets.resolve(ref)
    if assets.gguf_split(path):  # one file: weights, config and tokenizer (e.g. asset:smollm2-135m-gguf)
        return path
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise PreflightError(f"stage_b.kd.teacher: '{path}' has no config.json (not a HF model directory "
                                 f"or a .gguf file)")
        return path
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if looks_like_path:
        raise PreflightError(f"stage_b.kd.teacher: '{ref}' does not exist (expected a HF causal LM directory, "
                                   f"a .gguf file, a hub id, or a tiny:/asset: reference)")
    try:
        assets.load_config(path)
    except Exception as e:  # offline hub ids fail here, before any training
        raise PreflightError(f"stage_b.kd.teacher: '{ref}' is neither a directory nor a loadable hub id ({e})") from None
    return path


def preflight(cfg: Config) -> dict:
    """Everything the task needs from the pair store and the teacher, with clear errors."""
    from ...data.shards import Manifest

    store = pair_store_dir(cfg)
    where = os.path.join(store, "manifest.json")
    require_file(where, "run `python -m coupling_dist.pair_store` first")
    man = Manifest.load(store).to_dict()
    zspec = (man.get("fields") or {}).get("z")
    if not zspec:
        raise PreflightError(f"{where}: no field 'z' (not a pair store?)")
    K, T, d = (int(x) for x in zspec["shape"])
    want_d = cfg.stage_a.latent_dim
    if d != want_d:
        raise PreflightError(f"{where}: latent width of field 'z' is {d} but the generator's latent width "
                                   f"(stage_a.latent_dim) is {want_d}; rebuild the pair store or fix the config")
    if int(man["seq_len"]) != T:
        raise PreflightError(f"{where}: seq_len {man['seq_len']} disagrees with field 'z' shape {zspec['shape']}")
    tok = man.get("tokenizer") or {}
    if not tok.get("vocab_size"):
        raise PreflightError(f"{where}: manifest names no tokenizer vocab_size")
    tok_vocab = int(tok["vocab_size"])
    kd, tp = cfg.stage_b.kd, cfg.stage_b.tp
    masked = cfg.stage_b.model.kind == "masked"
    teacher = None
    if kd.teacher is not None and kd.weight > 0:
        path = _teacher_path(kd.teacher)
        t_tok = assets.tokenizer_identity(path)
        if tok.get("hash") and t_tok["hash"] != tok["hash"]:
            raise PreflightError(
                f"stage_b.kd.teacher '{kd.teacher}' uses tokenizer {t_tok['name']!r} (vocab {t_tok['vocab_size']}, hash "
                f"{t_tok['hash']}) but the pair store {where} was tokenized with {tok.get('name')!r} (vocab "
                f"{tok.get('vocab_size')}, hash {tok['hash']}); KD needs the same tokenizer")
        tconf = assets.load_config(path)
        t_vocab = int(tconf.vocab_size)
        if t_vocab < tok_vocab + (1 if masked else 0):
            raise PreflightError(f"stage_b.kd.teacher: vocabulary {t_vocab} is smaller than the tokenizer's "
                                       f"{tok_vocab}{' + a mask token' if masked else ''}")
        if t_vocab % tp:
            raise PreflightError(f"stage_b.tp ({tp}) must divide the teacher vocabulary ({t_vocab}) for the "
                                       f"vocab-parallel head")
        teacher = {"path": path, "ref": kd.teacher, "vocab_size": t_vocab, "hidden": int(tconf.hidden_size),
                   "identity": assets.identity(path)}
        vocab = t_vocab  # student head split exactly like the teacher's
    else:
        # A multiple of 1024 for TP <= 8: the head's shape then does not depend on TP, so a
        # checkpoint can be resumed at another TP size (distributed.tp_reshape).
        vocab = _round_up(tok_vocab + (1 if masked else 0), math.lcm(1024, 128 * tp))
    mask_id = vocab - 1 if masked else None
    return {"store": store, "manifest": man, "K": K, "seq_len": T, "latent_dim": d, "vocab_size": vocab,
            "tokenizer": tok, "tok_vocab": tok_vocab, "teacher": teacher, "mask_token_id": mask_id,
            "eos_id": tok.get("eos_id"), "pad_id": tok.get("pad_id")}

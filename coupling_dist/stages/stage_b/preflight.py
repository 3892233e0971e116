"""Stage B pre-flight, before any training: the pair store exists and its latent width equals
``stage_a.latent_dim``; the KD teacher exists and shares the pair store's tokenizer (with
``stage_b.kd.source: cache``, the store's KD cache was made by that teacher at that temperature); ``stage_b.tp``
divides the world size, the heads, the FFN and the teacher vocabulary; the global batch splits over
the data-parallel ranks. Every refusal is a ``PreflightError`` (exit status 2) naming the key/path.
``checked_task_info`` returns what the task needs (shapes, vocabulary, teacher, special ids).
Under ``data.vocab: corpus`` the head covers the pair store's compact vocabulary (``data/vocab.py``),
the mask token of the masked denoiser comes right after the compact ids, and the head is padded
as for a teacher-less run (a multiple of 1024 and of 128 * tp). A class-conditional run
(``data.num_classes`` > 0) needs the pair store's ``label`` field (and, for the composite, a Stage A
export with the same number of classes).
"""
from __future__ import annotations

import os

from ...components import assets
from ...components.paths import pair_store_dir
from ...components.preflight import PreflightError, require_file, require_labels, teacher_path
from ...config import Config
from ...data.vocab import vocab_for
from ...distributed.parallel_state import check_layout
from ...domains import build_domain
from ...models.teacher import CACHE_FIELDS, cache_record


def checked_task_info(cfg: Config, world: int) -> dict:
    check_layout(cfg.stage_b.tp, world)
    info = preflight(cfg)
    if cfg.stage_b.train.batch_size % (world // cfg.stage_b.tp):
        raise PreflightError(f"stage_b.train.batch_size ({cfg.stage_b.train.batch_size}) must be divisible by the "
                             f"data-parallel size {world // cfg.stage_b.tp} (world {world} / stage_b.tp {cfg.stage_b.tp})")
    return info


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
    K, P, d = (int(x) for x in zspec["shape"])  # P latent positions: T tokens / stage_a.patch
    want_d = cfg.stage_a.latent_dim
    if d != want_d:
        raise PreflightError(f"{where}: latent width of field 'z' is {d} but the generator's latent width "
                                   f"(stage_a.latent_dim) is {want_d}; rebuild the pair store or fix the config")
    T = int(man["seq_len"])
    if T % P or T // P != cfg.stage_a.patch:
        raise PreflightError(f"{where}: seq_len {man['seq_len']} over the {P} latent positions of field 'z' (shape "
                             f"{zspec['shape']}) is not stage_a.patch = {cfg.stage_a.patch} tokens per position; "
                             f"rebuild the pair store or fix the config")
    tok = man.get("tokenizer") or {}
    if not tok.get("vocab_size"):
        raise PreflightError(f"{where}: manifest names no tokenizer vocab_size")
    tok_vocab = int(tok["vocab_size"])
    kd, tp = cfg.stage_b.kd, cfg.stage_b.tp
    masked = cfg.stage_b.model.kind == "masked"
    try:
        compact = vocab_for(cfg, store)
    except ValueError as e:
        raise PreflightError(f"data.vocab=corpus: {e}") from None
    teacher = None
    if kd.teacher is not None and kd.weight > 0:
        path = teacher_path(kd.teacher)
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
        if t_vocab % tp and compact is None:
            raise PreflightError(f"stage_b.tp ({tp}) must divide the teacher vocabulary ({t_vocab}) for the "
                                       f"vocab-parallel head")
        teacher = {"path": path, "ref": kd.teacher, "vocab_size": t_vocab, "hidden": int(tconf.hidden_size),
                   "identity": assets.identity(path), "source": kd.source}
        if kd.source == "cache":
            if compact is not None:  # cached ids are tokenizer ids; mapping them is not built yet
                raise PreflightError("stage_b.kd.source=cache with data.vocab=corpus is not supported yet: "
                                     "use stage_b.kd.source=live or data.vocab=full")
            check_cache(man, where, cfg, path)
        vocab = t_vocab  # student head split exactly like the teacher's
    # The domain's head layout (text: a multiple of 1024 for TP <= 8, so the head's shape does not
    # depend on TP and a checkpoint can be resumed at another TP size: distributed.tp_reshape)
    domain = build_domain(cfg)
    if compact is not None:
        # the teacher's rows for the compact ids are gathered into a head of this size (task.py)
        vocab = domain.head_rows(compact.size + (1 if masked else 0), tp)
    elif teacher is None:
        vocab = domain.head_rows(tok_vocab + (1 if masked else 0), tp)
    mask_id = (vocab - 1 if compact is None else compact.size) if masked else None
    require_labels(man.get("fields"), where, cfg.data.num_classes)  # class-conditional: the pairs carry labels
    return {"store": store, "manifest": man, "K": K, "seq_len": T, "patch": T // P, "latent_dim": d, "vocab_size": vocab,
            "tokenizer": tok, "tok_vocab": tok_vocab, "teacher": teacher, "mask_token_id": mask_id,
            "eos_id": tok.get("eos_id"), "pad_id": tok.get("pad_id"), "vocab": compact,
            "stage_a": check_composite(cfg, man, where) if cfg.stage_b.model.kind == "composite" else None,
            "num_classes": int(cfg.data.num_classes)}


def check_composite(cfg: Config, man: dict, where: str) -> str:
    """``stage_b.model.kind: composite`` starts from the very Stage A export the pair store was
    encoded with (its path and sha256 are in the store's manifest); returns that path."""
    from ...models.stage_a_export import artifact_hash, read_meta

    rec = man.get("stage_a_artifact") or {}
    art = rec.get("path")
    if cfg.stage_b.tp != 1:
        raise PreflightError(f"stage_b.model.kind=composite runs at stage_b.tp=1 only (got {cfg.stage_b.tp}); "
                             f"use data parallelism")
    if not art or not os.path.isfile(os.path.join(art, "model.safetensors")):
        raise PreflightError(f"stage_b.model.kind=composite needs the Stage A export the pair store {where} was "
                             f"made from, but {art!r} is gone; re-export Stage A and rebuild the pair store")
    if artifact_hash(art) != rec.get("sha256"):
        raise PreflightError(f"stage_b.model.kind=composite: the Stage A export {art} changed since the pair store "
                             f"{where} was made from it (sha256 differs); rebuild the pair store")
    art_meta = read_meta(art)
    sa = art_meta["stage_a"]
    if int(art_meta.get("num_classes", 0)) != cfg.data.num_classes:  # G(z, y) = D(NF^-1(z; y)): the same classes
        raise PreflightError(f"stage_b.model.kind=composite: the Stage A export {art} has num_classes "
                             f"{int(art_meta.get('num_classes', 0))} but data.num_classes is {cfg.data.num_classes}; "
                             f"re-run stage_a and the pair store with this config")
    if sa["flow"]["kind"] != "realnvp" or sa.get("pad_positions", "encoded") != "encoded":
        raise PreflightError(f"stage_b.model.kind=composite needs a Stage A export with stage_a.flow.kind=realnvp and "
                             f"stage_a.pad_positions=encoded (one parallel inverse pass over every position); {art} has "
                             f"flow {sa['flow']['kind']!r}, pad_positions {sa.get('pad_positions')!r}")
    return art


def check_cache(man: dict, where: str, cfg: Config, path: str) -> None:
    """``stage_b.kd.source: cache``: the pair store holds a KD cache made by this teacher at this
    temperature (the manifest's ``teacher_cache``); otherwise KD would silently distil another model."""
    kd = cfg.stage_b.kd
    rec = man.get("teacher_cache")
    missing = [f for f in CACHE_FIELDS if f not in (man.get("fields") or {})]
    if not rec or missing:
        raise PreflightError(f"stage_b.kd.source = cache but the pair store {where} holds no KD teacher cache "
                             f"(fields {missing or list(CACHE_FIELDS)}); rebuild it with pair_store.teacher_topk > 0 "
                             f"or set stage_b.kd.source=live")
    want = cache_record(kd.teacher, path, kd.temperature, int(rec.get("topk", 0)))
    problems = []
    if (rec.get("teacher") or {}).get("hash") != want["teacher"]["hash"]:
        problems.append(f"stage_b.kd.teacher: cache made by {rec.get('teacher')} but the config's teacher is "
                        f"{want['teacher']}")
    if abs(float(rec.get("temperature", -1.0)) - want["temperature"]) > 1e-9:
        problems.append(f"stage_b.kd.temperature: cache made at {rec.get('temperature')} but the config says "
                        f"{want['temperature']}")
    if problems:
        raise PreflightError(f"{where}: the KD teacher cache does not match stage_b.kd: " + "; ".join(problems)
                             + " (rebuild the pair store with this teacher/temperature, or set stage_b.kd.source=live)")

"""Provenance: what a stage's output was made from, so the pipeline never builds on stale outputs.

A stage's completion marker (``_COMPLETE.json``, written by ``cli.run_entry``) carries a
``provenance`` record:

- ``inputs``: {name: {fingerprint, files}} for every artifact the stage reads (``stage_inputs``).
  An artifact that a stage of this run.dir wrote at its default place is fingerprinted by that
  stage's own marker (its ``provenance.fingerprint``), so the chain is Merkle-like and nothing big
  is hashed again; anything else (the corpus, an overridden path such as ``pair_store.artifact``)
  by content: sha256 of its files, where a file whose size and mtime equal the last record's
  reuses the recorded sha256 (a shard set is fingerprinted by its manifest, which lists the sha256
  of every shard).
- ``config``: {dotted key: value} of the config keys that determine the output (``config_record``);
  keys that only say how to run (ranks, Ray, checkpoint interval, paths) are left out.
- ``outputs``: {name: {path, files, sha256}} of what the stage wrote.
- ``fingerprint``: sha256 over the inputs' fingerprints, the config record and the outputs' sha256;
  what the stages downstream record as their input.

``stale_reason`` says why a complete stage no longer matches (an input or a config key changed, an
output is missing or was modified); the pipeline then re-runs it and, through the chain, everything
downstream of it. ``move_aside`` renames a stage's directory to ``<dir>.stale-<time>`` first, so
the re-run cannot resume from checkpoints made with the old inputs; nothing is deleted.

A stage that starts writes ``_INPUTS.json`` (inputs + config) into its directory (``begin``); a
partial run (no marker yet) whose inputs differ is stale in the same way, and a stage started by
hand refuses to resume checkpoints made from other inputs (``PreflightError``, exit status 2).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import NamedTuple, Optional

from . import paths
from .atomic import write_json
from .preflight import PreflightError
from ..data.shards import sha256_file

STARTED = "_INPUTS.json"  # a started stage's inputs and config (its partial state's provenance)
STALE = ".stale-"  # <stage dir>.stale-<time>: a directory moved aside before a re-run

# What each stage's output depends on: (included key prefixes, excluded keys). Excluded: how a stage
# runs (ranks, Ray, devices, checkpoint cadence, resume, TP layout), paths (their content is an
# input), and what an input's fingerprint already covers (data.corpus: the corpus files' content).
_TRAIN_HOW = ("ckpt_interval", "keep_last", "eval_interval", "eval_batches", "resume", "peak_flops",
              "activation_checkpointing", "offload_optimizer", "zero_stage")
CONFIG_KEYS = {
    "preprocess": (("data.", "encoder.", "stage_a.online_encoder"),
                   ("data.corpus", "data.out_dir", "data.verify_existing", "data.vocab", "data.num_classes",
                    "encoder.batch_size", "encoder.device")),
    "stage_a": (("run.seed", "data.vocab", "data.num_classes", "stage_a."), ("stage_a.ray_workers",)
                + tuple(f"stage_a.train.{k}" for k in _TRAIN_HOW)),
    "pair_store": (("run.seed", "pair_store."), ("pair_store.artifact", "pair_store.ray_workers", "pair_store.device")),
    "stage_b": (("run.seed", "data.vocab", "data.num_classes", "stage_b."), ("stage_b.ray_workers", "stage_b.tp", "stage_b.model.attention",
                                                        "stage_b.kd.chunk_positions", "stage_b.kd.chunk_vocab")
                + tuple(f"stage_b.train.{k}" for k in _TRAIN_HOW)),
    "finetune": (("run.seed", "finetune."), ("finetune.export", "finetune.reward", "finetune.ray_workers", "finetune.tp")
                 + tuple(f"finetune.train.{k}" for k in _TRAIN_HOW)),
    "sample": (("sample.",), ("sample.export", "sample.out", "sample.ray_workers", "sample.classifier.path")),
    "classifier": (("run.seed", "classifier."), ("classifier.out",)),
    "evaluate": (("evaluate.", "sample.", "data.tokenizer", "data.seq_len"),
                 ("evaluate.samples", "evaluate.reference", "evaluate.num_actors", "sample.export", "sample.out",
                  "sample.ray_workers", "sample.num_samples", "sample.classifier.path")),
}


class Input(NamedTuple):
    name: str  # how the log names it ("stage_a export")
    producer: Optional[str]  # the stage of this run.dir that writes it at this path, or None
    path: object  # a path, or a list of files
    kind: str  # "shards" (a shard set dir: its manifest), "export" (a dir: its files), "file", "files"


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def stage_inputs(cfg, stage: str) -> list[Input]:
    """The artifacts ``stage`` reads under ``cfg`` (what its marker fingerprints)."""
    P = paths
    data = Input("shard set", "preprocess", P.data_dir(cfg), "shards")
    if stage == "preprocess":
        from .assets import resolve_corpus

        try:
            files = resolve_corpus(cfg.data.corpus)
        except (FileNotFoundError, ValueError, OSError):  # preprocess itself reports it
            files = []
        return [Input("corpus", None, files, "files")]
    if stage in ("stage_a", "classifier"):
        return [data]
    if stage == "pair_store":
        art = P.stage_a_artifact(cfg)
        return [data, Input("stage_a export", "stage_a" if _same(art, P.stage_a_export(cfg)) else None, art, "export")]
    if stage == "stage_b":
        return [Input("pair store", "pair_store", P.pair_store_dir(cfg), "shards")]
    if stage == "finetune":
        src, reward = P.finetune_source(cfg), P.finetune_reward(cfg)
        return [Input("generator export", "stage_b" if _same(src, P.generator_export(cfg)) else None, src, "export"),
                Input("reward classifier", "classifier" if _same(reward, P.reward_classifier(cfg)) else None,
                      reward, "export")]
    if stage == "sample":
        out = [_export_input(cfg, cfg.sample.kind)]
        return out + (_guidance_inputs(cfg, finetuned=False) if cfg.sample.guidance == "classifier" else [])
    if stage == "evaluate":
        e = cfg.evaluate
        out = []
        if e.samples is None or _same(e.samples, P.samples_file(cfg)):
            out.append(Input("samples", "sample", P.samples_file(cfg), "file"))
        else:
            import glob

            files = sorted(glob.glob(e.samples)) if any(c in e.samples for c in "*?[") else [e.samples]
            out.append(Input("samples", None, files, "files"))
        if e.sweep:
            out.append(_export_input(cfg, "generator"))
            if e.stage_a_series:
                out.append(_export_input(cfg, "stage_a"))
        out.append(Input("reference", None, [e.reference], "files") if e.reference else data)
        if e.guidance.enabled and cfg.data.num_classes > 0:  # the guidance table reads these two as well
            out += _guidance_inputs(cfg, finetuned=e.guidance.finetune_series)
        return out
    raise ValueError(f"unknown stage {stage!r}")


def _guidance_inputs(cfg, finetuned: bool) -> list[Input]:
    """The reward classifier latent classifier guidance reads, and (``finetuned``) the reward
    fine-tuned export the guidance table scores."""
    reward = paths.guidance_classifier(cfg)
    out = [Input("reward classifier", "classifier" if _same(reward, paths.reward_classifier(cfg)) else None,
                 reward, "export")]
    if finetuned:
        out.append(Input("finetune export", "finetune", paths.finetune_export(cfg), "export"))
    return out


def _export_input(cfg, kind: str) -> Input:
    path = paths.sampling_export(cfg, kind)
    producer, default = ("stage_a", paths.stage_a_export(cfg)) if kind == "stage_a" else ("stage_b", paths.generator_export(cfg))
    if kind != "stage_a" and _same(path, paths.finetune_export(cfg)):  # sample.export = the fine-tuned generator
        producer, default = "finetune", paths.finetune_export(cfg)
    return Input(f"{producer} export", producer if _same(path, default) else None, path, "export")


def stage_outputs(cfg, stage: str) -> dict:
    """{name: (path, kind)} of what ``stage`` writes."""
    return {
        "preprocess": {"shard set": (paths.data_dir(cfg), "shards")},
        "stage_a": {"export": (paths.stage_a_export(cfg), "export")},
        "pair_store": {"pair store": (paths.pair_store_dir(cfg), "shards")},
        "stage_b": {"export": (paths.generator_export(cfg), "export")},
        "finetune": {"export": (paths.finetune_export(cfg), "export")},
        "sample": {"samples": (paths.samples_file(cfg), "file")},
        "evaluate": {"results": (paths.eval_results(cfg), "file")},
        "classifier": {"reward classifier": (paths.reward_classifier(cfg), "export")},
    }[stage]


def upstream(cfg, stage: str) -> list[str]:
    """The stages of this run.dir whose outputs ``stage`` reads."""
    return sorted({i.producer for i in stage_inputs(cfg, stage) if i.producer})


def dependents(cfg, stage: str, stages) -> list[str]:
    """``stage`` and every stage of ``stages`` downstream of it (transitively), in ``stages`` order."""
    out = {stage}
    for s in stages:  # stages are in pipeline order: one pass reaches every descendant
        if s not in out and any(u in out for u in upstream(cfg, s)):
            out.add(s)
    return [s for s in stages if s in out]


# --------------------------------------------------------------------------- hashing


def _files_of(path, kind: str) -> list[str]:
    if kind == "files":
        return [p for p in (path or []) if p]
    if kind == "file":
        return [path]
    if kind == "shards":
        return [os.path.join(path, "manifest.json")]
    if kind == "export":  # the directory's own files (weights, config, vocabulary), not subdirectories
        if not os.path.isdir(path):
            return [os.path.join(path, "config.json")]
        return sorted(os.path.join(path, f) for f in os.listdir(path)
                      if os.path.isfile(os.path.join(path, f)) and not f.startswith("."))
    raise ValueError(kind)


def content_id(path, kind: str, cache: Optional[dict] = None) -> tuple[Optional[str], dict]:
    """(sha256 over the files' names and contents, {file: [size, mtime_ns, sha256]}); None when a
    file is missing. ``cache``: a previous ``files`` record; a file with the same size and mtime
    reuses its sha256 instead of being read again."""
    cache = cache or {}
    files, h = {}, hashlib.sha256()
    for f in _files_of(path, kind):
        try:
            st = os.stat(f)
        except OSError:
            return None, {}
        key = os.path.abspath(f)
        old = cache.get(key)
        sha = old[2] if old and old[0] == st.st_size and old[1] == st.st_mtime_ns else sha256_file(f)
        files[key] = [st.st_size, st.st_mtime_ns, sha]
        h.update(os.path.basename(f).encode() + b"\0" + sha.encode() + b"\0")
    return (h.hexdigest() if files else None), files


def marker_fingerprint(cfg, stage: str) -> Optional[str]:
    """The fingerprint of ``stage``'s completion marker: its ``provenance.fingerprint``, or for a
    marker written before provenance existed the sha256 of the marker file; None when not complete."""
    path = paths.completion_marker(cfg, stage)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        fp = (json.loads(raw).get("provenance") or {}).get("fingerprint")
    except ValueError:
        fp = None
    return fp or hashlib.sha256(raw).hexdigest()


def input_record(cfg, stage: str, previous: Optional[dict] = None) -> dict:
    """{name: {fingerprint, via, files}} of the stage's inputs now (``previous``: the last record,
    whose file hashes are reused where size and mtime are unchanged)."""
    previous = previous or {}
    out = {}
    for inp in stage_inputs(cfg, stage):
        fp = marker_fingerprint(cfg, inp.producer) if inp.producer else None
        if fp is not None:
            out[inp.name] = {"fingerprint": fp, "via": f"{inp.producer} marker"}
            continue
        sha, files = content_id(inp.path, inp.kind, (previous.get(inp.name) or {}).get("files"))
        out[inp.name] = {"fingerprint": sha, "via": "content", "files": files}
    return out


def config_record(cfg, stage: str) -> dict:
    """{dotted key: value} of the config keys that determine ``stage``'s output."""
    include, exclude = CONFIG_KEYS[stage]
    flat = _flatten(cfg.to_dict())
    keys = [k for k in flat if any(k == p or (p.endswith(".") and k.startswith(p)) for p in include)
            and k not in exclude]
    if stage == "pair_store" and cfg.pair_store.teacher_topk:  # the cached teacher's identity
        keys += ["stage_b.kd.teacher", "stage_b.kd.temperature"]
    out = {k: flat[k] for k in sorted(keys)}
    if stage in ("stage_a", "pair_store") and cfg.stage_a.online_encoder:
        out.update(online_encoder_record(cfg))
    return out


def online_encoder_record(cfg) -> dict:
    """Under ``stage_a.online_encoder`` Stage A and the pair store run the frozen encoder
    themselves: its keys, its identity (``assets.identity``: the hash the shard manifests record)
    and the training precision it computes in are then part of what determines their output."""
    from .assets import identity

    e = cfg.encoder
    try:
        ident = identity(e.model)["hash"]
    except (OSError, ValueError):  # the stage's pre-flight reports an unloadable encoder
        ident = None
    return {"encoder.model": e.model, "encoder.layer": e.layer, "encoder.dtype": e.dtype,
            "encoder.identity": ident, "stage_a.train.precision": cfg.stage_a.train.precision}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- the stage side (run_entry)


def begin(cfg, stage: str) -> dict:
    """At a stage's start (one process per stage: rank 0 / the launcher): refuse to resume
    checkpoints made from other inputs, then record the inputs and config in ``_INPUTS.json``."""
    d = paths.stage_dir(cfg, stage)
    started = _read(os.path.join(d, STARTED)) or (paths.read_completion(cfg, stage) or {}).get("provenance")
    rec = {"stage": stage, "inputs": input_record(cfg, stage, (started or {}).get("inputs")),
           "config": config_record(cfg, stage), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    train = getattr(getattr(cfg, stage, None), "train", None)
    ckpt = os.path.join(d, "checkpoints")
    if started and train is not None and train.resume == "auto" and os.path.isdir(ckpt) and os.listdir(ckpt):
        changed = _input_changes(started.get("inputs") or {}, rec["inputs"])
        if changed:
            raise PreflightError(
                f"{ckpt} holds checkpoints of a run made from other inputs ({'; '.join(changed)}); resuming "
                f"them would mix the two. Move {d} aside (e.g. mv {d} {d}{STALE}old; the pipeline does this "
                f"itself), or set {stage}.train.resume=PATH to resume one on purpose")
    write_json(os.path.join(d, STARTED), rec)
    return rec


def complete(cfg, stage: str, started: dict) -> dict:
    """The marker's provenance record, once the stage finished: inputs and config as they were when
    it started, plus its outputs and the fingerprint over all three."""
    prev = ((paths.read_completion(cfg, stage) or {}).get("provenance") or {}).get("outputs") or {}
    outputs = {}
    for name, (path, kind) in stage_outputs(cfg, stage).items():
        sha, files = content_id(path, kind, (prev.get(name) or {}).get("files"))
        outputs[name] = {"path": os.path.abspath(path), "sha256": sha, "files": files}
    inputs = started["inputs"]
    fp = _hash({"inputs": {k: v["fingerprint"] for k, v in inputs.items()}, "config": started["config"],
                "outputs": {k: v["sha256"] for k, v in outputs.items()}})
    return {"fingerprint": fp, "inputs": inputs, "config": started["config"], "outputs": outputs}


def _read(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the pipeline side


def _short(fp: Optional[str]) -> str:
    return fp[:12] if fp else "none"


def _input_changes(old: dict, new: dict) -> list[str]:
    out = []
    for name, rec in new.items():
        was = (old.get(name) or {}).get("fingerprint")
        if was != rec["fingerprint"]:
            out.append(f"input {name} changed ({_short(was)} -> {_short(rec['fingerprint'])})")
    return out


def _config_changes(old: dict, new: dict) -> list[str]:
    keys = sorted(k for k in new if k in old and json.dumps(old[k], sort_keys=True, default=str)
                  != json.dumps(new[k], sort_keys=True, default=str))
    return [f"config {k} changed ({old[k]!r} -> {new[k]!r})" for k in keys]


def _changes_since(cfg, stage: str, rec: dict) -> list[str]:
    """How the stage's inputs and config now differ from ``rec`` (a start or provenance record)."""
    return (_input_changes(rec.get("inputs") or {}, input_record(cfg, stage, rec.get("inputs")))
            + _config_changes(rec.get("config") or {}, config_record(cfg, stage)))


def stale_reason(cfg, stage: str, done: Optional[dict]) -> Optional[str]:
    """Why ``stage`` must run again although it may be complete, or None. ``done``: its marker (None:
    not complete; a partial run whose ``_INPUTS.json`` differs from now is stale too)."""
    if done is None:
        started = _read(os.path.join(paths.stage_dir(cfg, stage), STARTED))
        changes = _changes_since(cfg, stage, started) if started else []
        return f"its partial run was started from other inputs: {'; '.join(changes)}" if changes else None
    prov = done.get("provenance")
    if not prov:
        return None  # a marker from before provenance: not checked (the pipeline says so)
    changes = _changes_since(cfg, stage, prov)
    for name, (path, kind) in stage_outputs(cfg, stage).items():
        rec = (prov.get("outputs") or {}).get(name) or {}
        sha, _ = content_id(path, kind, rec.get("files"))
        if sha is None:
            changes.append(f"its output {path} is missing")
        elif rec.get("sha256") and sha != rec["sha256"]:
            changes.append(f"its output {path} was modified after the stage completed")
    return "; ".join(changes) or None


def stale_dirs(cfg, stage: str) -> list[str]:
    """What a re-run of ``stage`` moves aside: its directory, and preprocess's default shard set
    (a shard set at ``data.out_dir`` is not this run's to move: preprocess refuses it if its
    settings differ)."""
    out = [paths.stage_dir(cfg, stage)]
    if stage == "preprocess" and cfg.data.out_dir is None:
        out.append(paths.data_dir(cfg))
    return [d for d in out if os.path.isdir(d)]


def move_aside(cfg, stage: str) -> list[tuple[str, str]]:
    """Rename ``stale_dirs`` to ``<dir>.stale-<YYYYmmdd-HHMMSS>`` (never deletes); returns the moves."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moves = []
    for d in stale_dirs(cfg, stage):
        dst, n = f"{d}{STALE}{stamp}", 1
        while os.path.exists(dst):
            dst, n = f"{d}{STALE}{stamp}-{n}", n + 1
        os.rename(d, dst)
        moves.append((d, dst))
    return moves

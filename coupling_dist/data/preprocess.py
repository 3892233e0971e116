"""Preprocessing: corpus -> tokens (+ frozen-encoder features) -> WebDataset shards + manifest.

Pipeline (``preprocess(cfg) -> manifest path``; entry: ``python -m coupling_dist.preprocess``):

1. Settings that determine the bytes (corpus content hash, tokenizer/encoder identity, layer,
   dtype, seq_len, shard_size, split, max_samples) are hashed into the set *fingerprint*. An
   output dir holding another fingerprint is refused (naming the differing settings) rather than
   mixed or overwritten.
2. The split is deterministic and independent of ``run.seed``: ``round(N * heldout_fraction)``
   indices chosen by a fixed-seed permutation are ``heldout``, the rest ``train``. Each split is
   cut, in corpus order, into shards of ``data.shard_size`` samples; key = global corpus index.
3. A planned shard is *done* when ``.parts/<shard>.json`` (its sidecar) carries its fingerprint
   and the file matches the sidecar's size and sha256 (``data.verify_existing``). Done shards are
   never rewritten; a re-run plans only the rest (nothing at all when everything is done).
4. Pending shards stream out of one corpus pass as tasks to Ray actors (``ShardWorker``): tokenize
   -> append EOS -> pad/truncate to seq_len with a mask -> optional encoder forward (no_grad,
   ``output_hidden_states``, layer ``encoder.layer``, stored as ``encoder.dtype``) -> atomic
   shard write -> sidecar. A failed task (exception or dead actor; actors restart) is resubmitted
   up to ``ray.max_retries`` times, then the run fails naming the shard.
5. The manifest is written last, only when every planned shard is done.

Shards are byte-deterministic (see ``shards.py``), so deleting one and re-running restores it
byte-identically with the same settings and thread count.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Iterator, Optional

import numpy as np

from .. import assets
from ..components.logging import get_logger, progress
from ..config import Config, ConfigError
from . import corpus as C
from . import shards as S

log = get_logger("preprocess")
PARTS = ".parts"
SPLIT_SEED = 20240601  # fixed: the data split must not change with the training seed
FAULT_ENV = "COUPLING_DIST_FAULT_PREPROCESS"  # forwarded to actors (ray_launch.FAULT_PREFIX)


class PreprocessError(RuntimeError):
    pass


# --------------------------------------------------------------------------- settings + plan


def encoder_info(model_ref: Optional[str], layer: int, dtype: str, tok_vocab: int) -> dict:
    """Identity and shape of the frozen encoder, validated before any work."""
    if model_ref is None:
        return {"name": None, "hash": None}
    from transformers import AutoConfig

    path = assets.resolve(model_ref)
    conf = AutoConfig.from_pretrained(path, local_files_only=os.path.exists(path))
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
                model_type=getattr(conf, "model_type", None))


def build_settings(cfg: Config) -> dict:
    d = cfg.data
    try:
        files = assets.resolve_corpus(d.corpus)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"'data.corpus' = {d.corpus!r}: {e}") from None
    try:
        tok = assets.tokenizer_identity(d.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"'data.tokenizer' = {d.tokenizer!r} cannot be loaded: {e}") from None
    enc = encoder_info(cfg.encoder.model, cfg.encoder.layer, cfg.encoder.dtype, tok["vocab_size"])
    return {"corpus": C.files_identity(files), "files": files, "format": d.format, "text_field": d.text_field,
            "tokenizer": tok, "encoder": enc, "seq_len": d.seq_len, "shard_size": d.shard_size,
            "heldout_fraction": d.heldout_fraction, "max_samples": d.max_samples, "split_seed": SPLIT_SEED}


def fingerprint(settings: dict) -> str:
    ident = {k: v for k, v in settings.items() if k != "files"}  # paths may move; content may not
    for k in ("tokenizer", "encoder"):  # a name is not identity: the same files under another path are fine
        ident[k] = {kk: vv for kk, vv in ident[k].items() if kk != "name"}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


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
            e["fingerprint"] = hashlib.sha256(json.dumps([set_fp, e], sort_keys=True).encode()).hexdigest()
            plan.append(e)
    return plan, held


def sidecar_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, PARTS, name + ".json")


def shard_done(out_dir: str, entry: dict, checksum: bool) -> Optional[dict]:
    """The shard's record if its file is finished for this plan entry, else None."""
    path, side = os.path.join(out_dir, entry["name"]), sidecar_path(out_dir, entry["name"])
    if not (os.path.isfile(path) and os.path.isfile(side)):
        return None
    try:
        with open(side, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != entry["fingerprint"] or rec.get("bytes") != os.path.getsize(path):
        return None
    if checksum and S.sha256_file(path) != rec.get("sha256"):
        log.warning("shard %s does not match its sidecar's sha256: it will be rewritten", entry["name"])
        return None
    return rec


def check_existing(out_dir: str, set_fp: str, settings: dict) -> None:
    """Refuse an output dir made with other settings (never mix two shard sets)."""
    path = S.Manifest.path(out_dir)
    if not os.path.isfile(path):
        return
    old = S.Manifest.load(out_dir).to_dict()
    if old.get("kind") != "preprocess" or old.get("fingerprint") == set_fp:
        if old.get("kind") != "preprocess":
            raise PreprocessError(f"{path}: holds a '{old.get('kind')}' shard set, not preprocess output; "
                                  f"choose another data.out_dir")
        return
    prev = old.get("settings") or {}
    diff = sorted(k for k in settings if k != "files" and json.dumps(prev.get(k), sort_keys=True)
                  != json.dumps(settings[k], sort_keys=True))
    raise PreprocessError(f"{path}: this directory holds shards made with other settings (differing: "
                          f"{diff or ['fingerprint']}); finished shards are never rewritten, so point "
                          f"data.out_dir elsewhere or delete the directory")


# --------------------------------------------------------------------------- the worker


class ShardWorker:
    """Tokenize + encode + write one shard per call. Runs as a Ray actor, or in-process (tests,
    benchmarks' single-process baseline)."""

    def __init__(self, tokenizer_ref: str, seq_len: int, out_dir: str, encoder: Optional[dict] = None,
                 threads: int = 1, device: str = "cpu"):
        import torch

        torch.set_num_threads(max(1, int(threads)))  # fixed per worker: same kernels on every run
        self.tok = assets.load_tokenizer(tokenizer_ref)
        self.seq_len, self.out_dir = int(seq_len), out_dir
        self.eos, self.pad = int(self.tok.eos_token_id), int(self.tok.pad_token_id)
        self.enc = dict(encoder or {})
        self.model = None
        self.device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        if self.enc.get("model"):
            from transformers import AutoModel

            path = assets.resolve(self.enc["model"])
            # AutoModel = the bare backbone (no LM head: no [T, V] logits for hidden states we
            # do not need); for a causal-LM checkpoint it loads the base model's weights.
            self.model = AutoModel.from_pretrained(path, local_files_only=os.path.exists(path),
                                                   dtype=torch.float32).to(self.device).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """ids + EOS, then truncated/padded to seq_len: (tokens int32 [B, T], mask uint8 [B, T], #truncated)."""
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
        return tokens, mask, truncated

    def encode(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        dtype, layer, bs = self.enc.get("dtype", "float16"), int(self.enc.get("layer", -1)), int(self.enc.get("batch_size", 64))
        outs = []
        with torch.no_grad():
            for i in range(0, len(tokens), bs):
                ids = torch.from_numpy(tokens[i:i + bs]).long().to(self.device)
                m = torch.from_numpy(mask[i:i + bs]).long().to(self.device)
                h = self.model(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states[layer]
                h = h.float() * m.unsqueeze(-1)  # pads are zero: they carry no information
                if dtype == "bfloat16":
                    outs.append(h.to(torch.bfloat16).view(torch.uint16).cpu().numpy())
                else:
                    outs.append(h.to(getattr(torch, dtype)).cpu().numpy())
        return np.concatenate(outs)

    def build(self, keys: list[str], texts: list[str]) -> tuple[list[dict], int]:
        tokens, mask, truncated = self.tokenize(texts)
        feats = self.encode(tokens, mask) if self.model is not None else None
        samples = []
        for j, key in enumerate(keys):
            s = {"__key__": key, "tokens": tokens[j], "mask": mask[j]}
            if feats is not None:
                s["features"] = feats[j]
            samples.append(s)
        return samples, truncated

    def process(self, task: dict) -> dict:
        _fault_hook(self.out_dir, task["name"])
        t0 = time.perf_counter()
        samples, truncated = self.build(task["keys"], task["texts"])
        path = os.path.join(self.out_dir, task["name"])
        rec = S.write_shard(path, samples)
        rec.update(split=task["split"], fingerprint=task["fingerprint"], first_key=task["keys"][0],
                   last_key=task["keys"][-1], truncated=truncated, tokens=int(sum(int(s["mask"].sum()) for s in samples)),
                   seconds=round(time.perf_counter() - t0, 3), pid=os.getpid())
        S.atomic_write_json(sidecar_path(self.out_dir, task["name"]), rec)  # after the shard: "done" marker
        return rec

    def ping(self) -> int:
        return os.getpid()


def _fault_hook(out_dir: str, name: str) -> None:
    """Test-only: ``COUPLING_DIST_FAULT_PREPROCESS=<shard name>`` kills the worker process the
    first time it starts that shard (a real crash; the marker file makes the retry succeed)."""
    if os.environ.get(FAULT_ENV) != name:
        return
    marker = os.path.join(out_dir, PARTS, f".fault-{name}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


# --------------------------------------------------------------------------- driver


def iter_tasks(files: list[str], cfg: Config, held: np.ndarray, plan: list[dict], pending: set) -> Iterator[dict]:
    """One corpus pass; yields the pending shards' tasks as soon as each is complete."""
    size = cfg.data.shard_size
    by_name = {e["name"]: e for e in plan}
    buf = {"train": ([], []), "heldout": ([], [])}
    count = {"train": 0, "heldout": 0}
    total = {"train": int((~held).sum()), "heldout": int(held.sum())}
    for i, text in enumerate(C.iter_corpus(files, cfg.data.format, cfg.data.text_field, limit=len(held))):
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


def init_ray(cfg: Config) -> bool:
    """Connect to ``ray.address`` (or the job's cluster under ``ray job submit``) or start a private
    local instance bound to loopback. Returns True when this call started Ray."""
    from ..components.ray_launch import init_ray as _init

    return _init(cfg.ray.address, cfg.ray.num_workers * cfg.ray.num_cpus_per_worker)


def run_tasks(cfg: Config, tasks: Iterator[dict], n_tasks: int, out_dir: str, enc: dict) -> list[dict]:
    import ray

    r = cfg.ray
    Actor = ray.remote(ShardWorker).options(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker,
                                            max_restarts=r.max_retries, max_task_retries=0)
    device = cfg.encoder.device if r.num_gpus_per_worker > 0 else "cpu"
    n_act = max(1, min(r.num_workers, n_tasks))
    actors: list = []
    inflight: dict = {}  # ref -> (actor index, task, attempt)
    load = [0] * n_act
    records: list[dict] = []
    bar = progress(total=n_tasks, desc="preprocess", enabled=cfg.run.progress)
    it = iter(tasks)

    def make_actor():
        return Actor.remote(cfg.data.tokenizer, cfg.data.seq_len, out_dir, enc, max(1, int(r.num_cpus_per_worker)), device)

    def revive(a, timeout_s=300.0):
        """Wait until actor ``a`` serves again (Ray restarts a dead actor up to ray.max_retries
        times; past that, or if it stays unreachable, it is replaced)."""
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            try:
                ray.get(actors[a].ping.remote(), timeout=timeout_s)
                return
            except ray.exceptions.ActorUnavailableError:  # restarting: its constructor is running
                time.sleep(0.5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                log.warning("worker %d is gone; starting a replacement", a)
                actors[a] = make_actor()
        raise PreprocessError(f"Ray worker {a} did not come back within {timeout_s:.0f}s")

    def submit(task, attempt):
        a = min(range(n_act), key=lambda k: load[k])
        load[a] += 1
        inflight[actors[a].process.remote(task)] = (a, task, attempt)

    actors.extend(make_actor() for _ in range(n_act))
    try:
        exhausted = False
        while True:
            while not exhausted and len(inflight) < 2 * n_act:  # bounded: texts are held only for queued shards
                task = next(it, None)
                if task is None:
                    exhausted = True
                else:
                    submit(task, 0)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            a, task, attempt = inflight.pop(ready[0])
            load[a] -= 1
            try:
                rec = ray.get(ready[0])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                if attempt >= r.max_retries:
                    raise PreprocessError(f"shard {task['name']}: failed {attempt + 1} time(s) "
                                          f"(ray.max_retries={r.max_retries}): {e}") from None
                log.warning("shard %s: attempt %d failed (%s); retrying", task["name"], attempt + 1,
                            type(e).__name__)
                if isinstance(e, ray.exceptions.RayActorError):
                    revive(a)
                submit(task, attempt + 1)
                continue
            records.append(rec)
            bar.update(1)
            log.info("wrote %s (%d samples, %d bytes, %.2fs in pid %s)", rec["name"], rec["count"], rec["bytes"],
                     rec["seconds"], rec["pid"])
    finally:
        bar.close()
        for act in actors:
            ray.kill(act)
    return records


def count_samples(files: list[str], cfg: Config) -> int:
    return sum(1 for _ in C.iter_corpus(files, cfg.data.format, cfg.data.text_field, limit=cfg.data.max_samples))


def preprocess(cfg: Config) -> str:
    """Make (or complete) the shard set at ``cfg.data_dir``; returns the manifest path."""
    t0 = time.perf_counter()
    out_dir = cfg.data_dir
    settings = build_settings(cfg)  # config/corpus/model errors before anything is created
    os.makedirs(os.path.join(out_dir, PARTS), exist_ok=True)
    set_fp = fingerprint(settings)
    check_existing(out_dir, set_fp, settings)
    for f in os.listdir(out_dir):  # leftovers of an interrupted write (atomic temp names)
        if f.startswith(".") and ".tmp." in f:
            os.remove(os.path.join(out_dir, f))
    files = settings["files"]
    n = count_samples(files, cfg)
    if n == 0:
        raise ConfigError(f"'data.corpus' = {cfg.data.corpus!r}: no non-empty sentences in {files}")
    plan, held = make_plan(n, cfg.data.heldout_fraction, cfg.data.shard_size, set_fp)
    checksum = cfg.data.verify_existing == "sha256"
    done = {e["name"]: rec for e in plan if (rec := shard_done(out_dir, e, checksum)) is not None}
    pending = {e["name"] for e in plan} - set(done)
    log.info("%d sentences -> %d shards (%d train, %d heldout samples); %d done, %d to write", n, len(plan),
             int((~held).sum()), int(held.sum()), len(done), len(pending))
    written: list[dict] = []
    if pending:
        enc = {"model": cfg.encoder.model, "layer": cfg.encoder.layer, "dtype": cfg.encoder.dtype,
               "batch_size": cfg.encoder.batch_size}
        started = init_ray(cfg)
        try:
            written = run_tasks(cfg, iter_tasks(files, cfg, held, plan, pending), len(pending), out_dir, enc)
        finally:
            if started:
                import ray

                ray.shutdown()
        done.update({rec["name"]: rec for rec in written})
    missing = [e["name"] for e in plan if e["name"] not in done]
    if missing:
        raise PreprocessError(f"{len(missing)} shard(s) unfinished ({missing[:5]}); manifest not written")
    return write_manifest(cfg, out_dir, plan, done, settings, set_fp, n, time.perf_counter() - t0, len(written))


def write_manifest(cfg: Config, out_dir: str, plan: list[dict], done: dict, settings: dict, set_fp: str,
                   n: int, seconds: float, n_written: int) -> str:
    T = cfg.data.seq_len
    fields = {"tokens": {"dtype": "int32", "shape": [T]}, "mask": {"dtype": "uint8", "shape": [T]}}
    enc = settings["encoder"]
    if enc.get("name"):
        fields["features"] = {"dtype": enc["dtype"], "shape": [T, enc["hidden_size"]]}
    shards = [{k: done[e["name"]][k] for k in ("name", "split", "count", "bytes", "sha256", "first_key", "last_key")}
              for e in plan]
    stats = {"sentences": n, "truncated": int(sum(done[e["name"]].get("truncated", 0) for e in plan)),
             "real_tokens": int(sum(done[e["name"]].get("tokens", 0) for e in plan))}
    man = S.Manifest(kind="preprocess", seq_len=T, fields=fields, shards=shards, tokenizer=settings["tokenizer"],
                     encoder=enc, extra={"fingerprint": set_fp, "stats": stats,
                                         "settings": {k: v for k, v in settings.items() if k != "files"}})
    path = S.Manifest.path(out_dir)
    if os.path.isfile(path) and n_written == 0:
        old = S.Manifest.load(out_dir)
        if old.extra.get("fingerprint") == set_fp and old.shards == man.to_dict()["shards"]:
            log.info("all %d shards present and verified; nothing to do (%s)", len(plan), path)
            return path
    man.save(out_dir)
    log.info("manifest written: %s (%d shards, %d written this run, %.1fs; %d of %d sentences truncated to seq_len %d)",
             path, len(plan), n_written, seconds, stats["truncated"], n, T)
    return path

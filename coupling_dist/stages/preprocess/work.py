"""Preprocessing: corpus -> tokens (+ frozen-encoder features) -> WebDataset shards + manifest.

Under ``stage_a.online_encoder`` the shards hold tokens and mask only; the manifest keeps the full
encoder record and an ``online_features`` entry (dtype, shape) in place of the ``features`` field,
so the stages that compute them check the same identity as for stored features.

``preprocess(cfg) -> manifest path`` (entry: ``python -m coupling_dist.preprocess``):

1. The settings, their fingerprint, the split and the shard plan (``plan``); an output dir made
   with other settings is refused before any work.
2. Finished shards are found through the resumable shard job (``data.shard_job``: sidecar with
   the shard's fingerprint, size, and sha256 when ``data.verify_existing`` is ``sha256``). Done
   shards are never rewritten; a re-run plans only the rest (nothing at all when everything is done).
3. Pending shards stream out of one corpus pass as tasks to the shared fault-tolerant Ray actor
   pool (``components.ray_pool``) of ``ShardWorker`` actors (``worker``). A failed task (exception
   or dead actor; actors restart) is resubmitted up to ``ray.max_retries`` times, then the run
   fails naming the shard.
4. The manifest is written last, only when every planned shard is done.

Shards are byte-deterministic (see ``data/shards.py``), so deleting one and re-running restores it
byte-identically with the same settings and thread count.
"""
from __future__ import annotations

import os
import time

from ...components.logging import get_logger, progress
from ...components.paths import data_dir
from ...config import Config, ConfigError
from ...data import shards as S
from ...data.shard_job import ShardJob
from ...domains import build_domain
from ...planning.run_plan import check_disk
from .plan import (PreprocessError, build_settings, check_existing, count_samples, fingerprint, iter_tasks,
                   make_plan)
from .worker import ShardWorker

log = get_logger("preprocess")


def run_tasks(cfg: Config, tasks, n_tasks: int, out_dir: str, enc: dict) -> list[dict]:
    """Write the pending shards on Ray actors; returns their records."""
    from ...components.ray_launch import init_ray
    from ...components.ray_pool import ActorPool

    r = cfg.ray
    started = init_ray(r.address, r.num_workers * r.num_cpus_per_worker)
    device = cfg.encoder.device if r.num_gpus_per_worker > 0 else "cpu"
    args = (build_domain(cfg).item_codec(), cfg.data.seq_len, out_dir, enc, max(1, int(r.num_cpus_per_worker)), device)
    records: list[dict] = []
    bar = progress(total=n_tasks, desc="preprocess", enabled=cfg.run.progress)
    try:
        with ActorPool(ShardWorker, args, min(r.num_workers, n_tasks), max_retries=r.max_retries, owns_ray=started,
                       options={"num_cpus": r.num_cpus_per_worker, "num_gpus": r.num_gpus_per_worker}) as pool:
            for _, rec in pool.map_unordered("process", tasks, label=lambda t: f"shard {t['name']}"):
                records.append(rec)
                bar.update(1)
                log.info("wrote %s (%d samples, %d bytes, %.2fs in pid %s)", rec["name"], rec["count"], rec["bytes"],
                         rec["seconds"], rec["pid"])
    finally:
        bar.close()
    return records


def preprocess(cfg: Config) -> str:
    """Make (or complete) the shard set at ``data.out_dir`` (default run.dir/data); returns the manifest path."""
    t0 = time.perf_counter()
    out_dir = data_dir(cfg)
    settings = build_settings(cfg)  # config/corpus/model errors before anything is created
    set_fp = fingerprint(settings)
    check_existing(out_dir, set_fp, settings)
    os.makedirs(out_dir, exist_ok=True)
    job = ShardJob(out_dir, verify=cfg.data.verify_existing)
    job.sweep_temporaries()  # leftovers of an interrupted write
    files = settings["files"]
    n = count_samples(files, cfg)
    if n == 0:
        raise ConfigError(f"'data.corpus' = {cfg.data.corpus!r}: no non-empty sentences in {files}")
    plan, held = make_plan(n, cfg.data.heldout_fraction, cfg.data.shard_size, set_fp)
    check_disk(cfg, "preprocess", samples=n)  # prints the bytes to write; refuses when they do not fit
    done, pending = job.collect((e["name"], e["fingerprint"]) for e in plan)
    log.info("%d sentences -> %d shards (%d train, %d heldout samples); %d done, %d to write", n, len(plan),
             int((~held).sum()), int(held.sum()), len(done), len(pending))
    written: list[dict] = []
    if pending:
        # stage_a.online_encoder: tokens only; Stage A and the pair store compute the features
        model = None if cfg.stage_a.online_encoder else cfg.encoder.model
        enc = {"model": model, "layer": cfg.encoder.layer, "dtype": cfg.encoder.dtype,
               "batch_size": cfg.encoder.batch_size}
        written = run_tasks(cfg, iter_tasks(files, cfg, held, plan, set(pending)), len(pending), out_dir, enc)
        done.update({rec["name"]: rec for rec in written})
    missing = [e["name"] for e in plan if e["name"] not in done]
    if missing:
        raise PreprocessError(f"{len(missing)} shard(s) unfinished ({missing[:5]}); manifest not written")
    return write_manifest(cfg, out_dir, plan, done, settings, set_fp, n, time.perf_counter() - t0, len(written))


def write_manifest(cfg: Config, out_dir: str, plan: list[dict], done: dict, settings: dict, set_fp: str,
                   n: int, seconds: float, n_written: int) -> str:
    T = cfg.data.seq_len
    fields = {"tokens": {"dtype": "int32", "shape": [T]}, "mask": {"dtype": "uint8", "shape": [T]},
              **build_domain(cfg).shard_fields()}
    enc = settings["encoder"]
    extra = {"fingerprint": set_fp}
    if enc.get("name"):
        feat = {"dtype": enc["dtype"], "shape": [T, enc["hidden_size"]]}
        if settings.get("online_features"):  # what Stage A will compute per batch (data.source)
            extra["online_features"] = feat
        else:
            fields["features"] = feat
    shards = [{k: done[e["name"]][k] for k in ("name", "split", "count", "bytes", "sha256", "first_key", "last_key")}
              for e in plan]
    stats = {"sentences": n, "truncated": int(sum(done[e["name"]].get("truncated", 0) for e in plan)),
             "real_tokens": int(sum(done[e["name"]].get("tokens", 0) for e in plan))}
    man = S.Manifest(kind="preprocess", seq_len=T, fields=fields, shards=shards, tokenizer=settings["tokenizer"],
                     encoder=enc, extra=dict(extra, stats=stats,
                                             settings={k: v for k, v in settings.items() if k != "files"}))
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

"""``python -m coupling_dist.pair_store --config FILE [overrides]``: write the (z, x) pair store.

Runs as N ranks -- torchrun, srun, or ``pair_store.ray_workers`` Ray actors from a single
process -- and every rank runs the same ``writer.run_rank`` on its disjoint slice of the source
shards (``data.out_dir``, all splits). Before any work, every rank (and the Ray driver) checks that
the Stage A artifact fits the shards (``preflight``: tokenizer, seq_len, feature width) and refuses
otherwise (exit status 2). After all ranks finished, rank 0 writes the manifest -- last -- and the
latent-matching report ``run.dir/pair_store/report.json`` (``report``).

Output: ``run.dir/pair_store/`` is a normal shard set (fields ``z`` [K, T, d] in
``pair_store.dtype``, ``tokens``, ``mask``; ``label`` [1] int16 when the Stage A export is
class-conditional (``num_classes`` > 0: z = NF(u; label) with the true label); with ``pair_store.teacher_topk`` = k > 0 also the KD
teacher's top-k cache ``teacher_ids`` / ``teacher_logp`` / ``teacher_tail``, ``models.teacher``),
read by Stage B through the same ShardLoader.

Source shards of ``stage_a.online_encoder`` hold tokens only: each rank then runs the frozen encoder
on every batch before encoding it (``online_features``), computing the features preprocess would
have stored.
"""
from __future__ import annotations

import json
import os

import torch

from ...components import dist as D
from ...components.logging import get_logger, setup_logging
from ...components.paths import stage_dir
from ...config import Config
from ...data.shard_job import ShardJob
from ...data.vocab import CompactVocab
from ...planning.run_plan import check_disk
from ...models.stage_a_export import load_stage_a
from ...components.assets import load_causal_lm
from ...components.trainer import training_dtype
from ...models.frozen_encoder import OnlineFeatures
from ...models.teacher import cache_fields, teacher_dtype
from . import writer
from .preflight import prepare
from .report import build_report, format_table

LOG = get_logger("pair_store")


class PairStoreError(RuntimeError):
    pass


def pick_device(cfg: Config) -> torch.device:
    want = cfg.pair_store.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return D.device() if torch.cuda.is_available() else torch.device("cuda")
    return torch.device("cpu")


def online_features(cfg: Config, device: torch.device) -> OnlineFeatures:
    """Token-only shards (``stage_a.online_encoder``): the frozen encoder on this rank, in Stage A's
    training precision on this device, so the latents see the features Stage A trained on."""
    e = cfg.encoder
    return OnlineFeatures(e.model, e.layer, e.dtype, device, training_dtype(cfg.stage_a.train.precision, device))


def write_manifest(cfg: Config, ctx: dict) -> dict:
    from ...data.shards import Manifest

    out_dir, plan = ctx["out_dir"], ctx["plan"]
    done, missing = ShardJob(out_dir).collect(writer.units(plan, ctx["artifact_hash"], ctx["settings"]))
    if missing:
        raise PairStoreError(f"{len(missing)} unit(s) unfinished ({missing[:5]}...); not writing the manifest "
                             f"(re-run to complete only the missing shards)")
    info, meta, ps = ctx["info"], ctx["meta"], cfg.pair_store
    T, d, K = info["seq_len"], int(meta["latent_dim"]), ps.multiplicity
    P = T // int(meta["stage_a"].get("patch", 1))  # latent positions: T / stage_a.patch
    fields = {"z": {"dtype": ps.dtype, "shape": [K, P, d]}, "tokens": {"dtype": "int32", "shape": [T]},
              "mask": {"dtype": "uint8", "shape": [T]}}
    if ctx["teacher_cache"]:
        fields.update(cache_fields(T, ctx["teacher_cache"]["topk"]))
    if int(meta.get("num_classes", 0)):  # class-conditional Stage A: every pair carries its class
        fields["label"] = {"dtype": "int16", "shape": [1]}
    extra = {"kind": "pair_store", "stage_a_artifact": {"path": os.path.abspath(ctx["artifact"]),
                                                        "sha256": ctx["artifact_hash"]},
             "source": {"path": os.path.abspath(ctx["data_dir"]), "shard_set_sha256": ctx["source_hash"]},
             "settings": ctx["settings"], "latent_dim": d, "multiplicity": K}
    if ctx["teacher_cache"]:  # which teacher and temperature made the cache: Stage B checks it
        extra["teacher_cache"] = ctx["teacher_cache"]
    man = Manifest.for_pairs(out_dir, [done[e["name"]] for e in plan], fields=fields, seq_len=T,
                             tokenizer=info["tokenizer"], encoder=info["encoder"], extra=extra)
    man.save(out_dir)
    return man


def _gather(result: dict, world: int) -> list[dict]:
    """Every rank's counts on every rank. Also the check that all ranks finished: a rank that died
    or raised never joins, so this collective fails and nobody writes the manifest."""
    if world == 1:
        return [result]
    out: list = [None] * world
    try:
        torch.distributed.all_gather_object(out, result)
    except Exception as e:
        if D.is_peer_failure(e):  # dist.exit_on_peer_failure: a message and exit 1, not a hang
            raise D.PeerFailure(f"rank {result['rank']}: another rank died before finishing its units "
                                f"({str(e).strip().splitlines()[0][:200]}); no manifest written; re-run the same "
                                f"command to complete only the missing shards") from e
        raise
    return out


def rank_main(cfg: Config) -> dict:
    """One rank (plain process, torchrun/srun rank, or Ray actor rank); rank 0 finishes the store."""
    info = D.init_distributed()
    rank, world = info["rank"], info["world"]
    setup_logging(stage_dir(cfg, "pair_store"), rank)
    ctx = prepare(cfg)  # every rank refuses a mismatched artifact before any work
    check_disk(cfg, "pair_store", show=rank == 0)  # the store fits the disk
    model, _ = load_stage_a(ctx["artifact"], pick_device(cfg))  # loaded once: the report reuses it
    ps = cfg.pair_store
    cache = None
    if ctx["teacher_cache"]:
        dev = pick_device(cfg)
        cache = {"model": load_causal_lm(ctx["teacher_path"], dev, teacher_dtype(dev)), "k": ps.teacher_topk,
                 "temperature": cfg.stage_b.kd.temperature}
    features = online_features(cfg, pick_device(cfg)) if ctx["online"] else None
    work = writer.run_rank(model=model, source_dir=ctx["data_dir"], plan=ctx["plan"], out_dir=ctx["out_dir"],
                           rank=rank, world=world, seed=cfg.run.seed, K=ps.multiplicity, dtype=ps.dtype,
                           batch_size=ps.batch_size, artifact_hash=ctx["artifact_hash"], settings=ctx["settings"],
                           device=pick_device(cfg), log=LOG.info, teacher_cache=cache,
                           vocab=CompactVocab.from_meta(ctx["meta"].get("vocab")), features=features)
    results = _gather(work, world)
    summary: dict = {"ranks": results}
    if rank == 0:
        write_manifest(cfg, ctx)
        report = build_report(cfg, ctx, model, features)
        LOG.info("pair store %s complete: %s", ctx["out_dir"], json.dumps(results))
        print("latent-matching report (" + os.path.join(ctx["out_dir"], "report.json") + "):\n" + format_table(report))
        lat = report["latents"]
        summary.update(pairs=sum(r.get("samples", 0) for r in results), kl_gauss_fit=lat.get("kl_gauss_fit"),
                       ks_fail_fraction=lat.get("ks_fail_fraction"),
                       recon_acc_heldout=report.get("recon_acc_heldout_from_u"), report=report)
    D.barrier()
    return summary  # run_entry / the Ray rank wrapper leave the process group


def main(cfg: Config) -> dict:
    # Ranks as Ray actors through the shared launcher (pair_store.ray_workers, or ray.num_workers
    # under `ray job submit`): it connects to ray.address / RAY_ADDRESS or starts a private
    # loopback instance (a bare ray.init() would attach to whatever cluster /tmp/ray names).
    from ...components.ray_launch import run_stage

    return run_stage(cfg, rank_main, "pair_store", cfg.pair_store.ray_workers, preflight=lambda world: prepare(cfg))

"""``python -m coupling_dist.pair_store --config FILE [overrides]``: write the (z, x) pair store.

Runs as N ranks -- torchrun, srun, or ``pair_store.ray_workers`` Ray actors from a single
process -- and every rank runs the same ``data.pair_writer.run_rank`` on its disjoint slice of the
source shards (``cfg.data_dir``, all splits). Before any work, every rank (and the Ray driver)
checks that the Stage A artifact fits the shards (tokenizer, seq_len, feature width) and refuses
otherwise (exit status 2). After all ranks finished, rank 0 writes the manifest -- last -- and
the latent-matching report ``run.dir/pair_store/report.json``.

Output: ``run.dir/pair_store/`` is a normal shard set (fields ``z`` [K, T, d] in
``pair_store.dtype``, ``tokens``, ``mask``), read by Stage B through the same ShardLoader.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Optional

import numpy as np
import torch

from .cli import run_entry
from .components import dist as D
from .components.logging import get_logger, setup_logging
from .config import Config
from .data import pair_writer as pw
from .data.latent_report import format_table, latent_stats
from .models.stage_a_export import artifact_hash, load_stage_a, read_meta
from .stage_a_task import DataMismatchError, describe_source

LOG = get_logger("pair_store")


class PairStoreError(RuntimeError):
    pass


def artifact_dir(cfg: Config) -> str:
    return cfg.pair_store.artifact or os.path.join(cfg.stage_dir("stage_a"), "export")


def pick_device(cfg: Config) -> torch.device:
    want = cfg.pair_store.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return D.device() if torch.cuda.is_available() else torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------- pre-flight


def check_artifact(meta: dict, info: dict, art: str, data_dir: str) -> None:
    """Refuse an artifact made for other shards, naming both sides."""
    src = os.path.join(data_dir, "manifest.json")
    if info["feature_dim"] is None:
        raise DataMismatchError(f"{src}: the source shards hold no 'features' field; the pair store encodes "
                                f"stored features (rerun preprocess with encoder.model set)")
    problems = []
    a_tok, s_tok = meta.get("tokenizer") or {}, info["tokenizer"]
    if a_tok.get("hash") != s_tok.get("hash"):
        problems.append(f"tokenizer: artifact {a_tok.get('name')!r} (hash {a_tok.get('hash')}) vs shards "
                        f"{s_tok.get('name')!r} (hash {s_tok.get('hash')})")
    if int(meta.get("seq_len", -1)) != info["seq_len"]:
        problems.append(f"seq_len: artifact {meta.get('seq_len')} vs shards {info['seq_len']}")
    if int(meta.get("feature_dim", -1)) != info["feature_dim"]:
        problems.append(f"feature width: artifact {meta.get('feature_dim')} vs shards {info['feature_dim']}")
    if int(meta.get("vocab_size", -1)) != info["vocab_size"]:
        problems.append(f"vocab_size: artifact {meta.get('vocab_size')} vs shards {info['vocab_size']}")
    if problems:
        raise DataMismatchError(f"Stage A artifact {art} does not match the source shards {src}: "
                                + "; ".join(problems) + " (re-export Stage A for these shards, or point "
                                "pair_store.artifact / data.out_dir at matching ones)")


def prepare(cfg: Config) -> dict:
    """Everything a rank needs, validated; pure reads, so every rank may call it."""
    from .data.shards import Manifest

    data_dir, art = cfg.data_dir, artifact_dir(cfg)
    meta = read_meta(art)
    man = Manifest.load(data_dir)
    info = describe_source(man, data_dir)
    check_artifact(meta, info, art, data_dir)
    plan = source_plan(man)
    if not plan:
        raise DataMismatchError(f"{os.path.join(data_dir, 'manifest.json')}: lists no shards")
    ps = cfg.pair_store
    settings = {"seed": cfg.run.seed, "multiplicity": ps.multiplicity, "dtype": ps.dtype, "batch_size": ps.batch_size}
    src_hash = hashlib.sha256(json.dumps([[e["name"], e.get("count"), e.get("sha256")] for e in plan]).encode()).hexdigest()
    return {"data_dir": data_dir, "artifact": art, "meta": meta, "info": info, "plan": plan,
            "settings": settings, "artifact_hash": artifact_hash(art), "source_hash": src_hash,
            "out_dir": cfg.stage_dir("pair_store")}


def source_plan(man) -> list[dict]:
    """Every source shard (all splits) as {name, split, count, sha256}, in a fixed order."""
    d = man if isinstance(man, dict) else man.to_dict()
    out = []
    for s in d.get("shards", []):
        out.append({"name": os.path.basename(s["name"]), "split": s["split"], "count": int(s["count"]),
                    "sha256": s.get("sha256")})
    return sorted(out, key=lambda e: e["name"])


# ---------------------------------------------------------------------- per-rank work


def work(cfg: Config, rank: int, world: int, ctx: Optional[dict] = None, model=None) -> dict:
    """One rank's share; no collectives (shared by torchrun/srun ranks and Ray actors)."""
    ctx = ctx or prepare(cfg)
    device = pick_device(cfg)
    model = model if model is not None else load_stage_a(ctx["artifact"], device)[0]
    ps = cfg.pair_store
    return pw.run_rank(model=model, source_dir=ctx["data_dir"], plan=ctx["plan"], out_dir=ctx["out_dir"], rank=rank,
                       world=world, seed=cfg.run.seed, K=ps.multiplicity, dtype=ps.dtype, batch_size=ps.batch_size,
                       artifact_hash=ctx["artifact_hash"], settings=ctx["settings"], device=device, log=LOG.info)


# ---------------------------------------------------------------------- manifest + report


def write_manifest(cfg: Config, ctx: dict) -> dict:
    from .data.shards import Manifest

    out_dir, plan = ctx["out_dir"], ctx["plan"]
    records, missing = [], []
    for entry in plan:
        rec = pw.unit_done(out_dir, entry, pw.fingerprint(ctx["artifact_hash"], entry, ctx["settings"]))
        (records.append(rec) if rec else missing.append(entry["name"]))
    if missing:
        raise PairStoreError(f"{len(missing)} unit(s) unfinished ({missing[:5]}...); not writing the manifest "
                             f"(re-run to complete only the missing shards)")
    info, meta, ps = ctx["info"], ctx["meta"], cfg.pair_store
    T, d, K = info["seq_len"], int(meta["latent_dim"]), ps.multiplicity
    fields = {"z": {"dtype": ps.dtype, "shape": [K, T, d]}, "tokens": {"dtype": "int32", "shape": [T]},
              "mask": {"dtype": "uint8", "shape": [T]}}
    extra = {"kind": "pair_store", "stage_a_artifact": {"path": os.path.abspath(ctx["artifact"]),
                                                        "sha256": ctx["artifact_hash"]},
             "source": {"path": os.path.abspath(ctx["data_dir"]), "shard_set_sha256": ctx["source_hash"]},
             "settings": ctx["settings"], "latent_dim": d, "multiplicity": K}
    man = Manifest.for_pairs(out_dir, records, fields=fields, seq_len=T, tokenizer=info["tokenizer"],
                             encoder=info["encoder"], extra=extra)
    man.save(out_dir)
    return man


def _read_store(out_dir: str, split: str, limit: int, dtype: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    from .data.shards import Manifest, read_shard

    man = Manifest.load(out_dir).to_dict()
    keys, zs, toks, masks = [], [], [], []
    for s in sorted(man["shards"], key=lambda s: s["name"]):
        if s["split"] != split or len(keys) >= limit:
            continue
        for smp in read_shard(os.path.join(out_dir, os.path.basename(s["name"]))):
            if len(keys) >= limit:
                break
            keys.append(smp["__key__"])
            zs.append(pw.from_store_dtype(smp["z"], dtype).numpy())
            toks.append(smp["tokens"])
            masks.append(smp["mask"])
    if not keys:
        return [], np.zeros((0,)), np.zeros((0,)), np.zeros((0,))
    return keys, np.stack(zs), np.stack(toks), np.stack(masks)


def _predict(model, u: torch.Tensor, mask: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """argmax tokens [B, T] with the vocabulary head applied to ``rows`` positions at a time:
    ``model.decode`` materialises [B, T, V] logits, 5 GB in fp32 for a batch of 64 at T 128 and
    Qwen's V 151,936."""
    h = model.decoder_hidden(u, mask)
    flat = h.reshape(-1, h.shape[-1])
    return torch.cat([model.head(c).argmax(-1) for c in flat.split(rows)]).view(h.shape[:2])


@torch.no_grad()
def build_report(cfg: Config, ctx: dict, model) -> dict:
    from .data.shards import read_shard

    ps, out_dir = cfg.pair_store, ctx["out_dir"]
    splits = sorted({e["split"] for e in ctx["plan"]})
    train_split = "train" if "train" in splits else splits[0]
    held = [s for s in splits if s != train_split]
    held_split = held[0] if held else train_split
    _, z, _, mask = _read_store(out_dir, train_split, ps.report_samples, ps.dtype)
    K = z.shape[1]
    report = {"split": train_split, "multiplicity": K, "dtype": ps.dtype,
              "latents": latent_stats(z.reshape(-1, *z.shape[2:]), np.repeat(mask, K, axis=0), ps.ks_alpha)}
    # Held-out reconstruction and round trips, on a bounded number of samples.
    n_rt = min(ps.report_samples, 256)
    src, keys = [], set()
    for e in ctx["plan"]:
        if e["split"] == held_split and len(src) < n_rt:
            src += read_shard(os.path.join(ctx["data_dir"], e["name"]))[:n_rt - len(src)]
    hkeys, hz, _, _ = _read_store(out_dir, held_split, n_rt, ps.dtype)
    zmap = dict(zip(hkeys, hz)) if hkeys else {}
    dev = next(model.parameters()).device
    correct = correct_z = total = 0
    rt_zuz = rt_uzu = 0.0
    for i in range(0, len(src), ps.batch_size):
        chunk = src[i:i + ps.batch_size]
        feats = torch.from_numpy(np.stack([s["features"] for s in chunk])).to(dev)
        m = torch.from_numpy(np.stack([s["mask"] for s in chunk])).to(dev).bool()
        tok = torch.from_numpy(np.stack([s["tokens"] for s in chunk])).to(dev).long()
        T = m.shape[1]
        eps = torch.stack([pw.sample_noise(cfg.run.seed, s["__key__"], 1, T, model.latent_dim)[0] for s in chunk]).to(dev)
        u = model.encode_latent(feats, m, eps)
        correct += int((_predict(model, u, m) == tok)[m].sum())
        total += int(m.sum())
        zf, _ = model.flow(u, m)
        rt_uzu = max(rt_uzu, float((model.from_gaussian(zf, m) - u).abs().max()))
        if all(s["__key__"] in zmap for s in chunk):
            zs = torch.from_numpy(np.stack([zmap[s["__key__"]][0] for s in chunk])).to(dev)
            us = model.from_gaussian(zs, m)
            correct_z += int((_predict(model, us, m) == tok)[m].sum())
            rt_zuz = max(rt_zuz, float((model.to_gaussian(us, m) - zs).abs().max()))
    report.update({"heldout_split": held_split, "heldout_samples": len(src),
                   "recon_acc_heldout_from_u": correct / max(total, 1),
                   "recon_acc_heldout_from_stored_z": correct_z / max(total, 1) if zmap else None,
                   "roundtrip_z_u_z_max_abs": rt_zuz, "roundtrip_u_z_u_max_abs": rt_uzu,
                   "stage_a_artifact_sha256": ctx["artifact_hash"]})
    if report["recon_acc_heldout_from_stored_z"] is None:
        report.pop("recon_acc_heldout_from_stored_z")
    pw._atomic_json(os.path.join(out_dir, "report.json"), report)
    return report


# ---------------------------------------------------------------------- entry


def _prepare_or_exit(cfg: Config) -> dict:
    try:
        return prepare(cfg)
    except (DataMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _gather(result: dict, world: int) -> list[dict]:
    """Every rank's counts on every rank. Also the check that all ranks finished: a rank that died
    or raised never joins, so this collective fails and nobody writes the manifest."""
    if world == 1:
        return [result]
    out: list = [None] * world
    try:
        torch.distributed.all_gather_object(out, result)
    except Exception as e:
        if D.is_peer_failure(e):  # cli.exit_on_peer_failure: a message and exit 1, not a hang
            raise D.PeerFailure(f"rank {result['rank']}: another rank died before finishing its units "
                                f"({str(e).strip().splitlines()[0][:200]}); no manifest written; re-run the same "
                                f"command to complete only the missing shards") from e
        raise
    return out


def rank_main(cfg: Config) -> dict:
    """One rank (plain process, torchrun/srun rank, or Ray actor rank); rank 0 finishes the store."""
    info = D.init_distributed()
    rank, world = info["rank"], info["world"]
    setup_logging(cfg.stage_dir("pair_store"), rank)
    ctx = _prepare_or_exit(cfg)  # every rank refuses a mismatched artifact before any work
    model, _ = load_stage_a(ctx["artifact"], pick_device(cfg))  # loaded once: the report reuses it
    results = _gather(work(cfg, rank, world, ctx, model), world)
    summary: dict = {"ranks": results}
    if rank == 0:
        write_manifest(cfg, ctx)
        report = build_report(cfg, ctx, model)
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
    from .components.ray_launch import run_stage

    return run_stage(cfg, rank_main, "pair_store", cfg.pair_store.ray_workers,
                     preflight=lambda world: _prepare_or_exit(cfg))


if __name__ == "__main__":
    raise SystemExit(run_entry("pair_store", main))

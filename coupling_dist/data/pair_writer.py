"""The per-rank work of the pair store: encode source shards into (z, tokens, mask) shards.

Work unit = one source shard -> one output shard of the same name (so the output mirrors the
source layout, splits included, and "is this unit done?" is a question about one file). Rank r of
W takes the units ``plan[r::W]``; no rank waits on another while working.

Determinism: the noise for sample ``key`` and latent k is drawn from a generator seeded by
sha256(seed, key, k), and batches are formed inside one source shard, so an output shard's bytes
depend only on (artifact, source shard, settings) -- not on the number of ranks or their order.

Completion: each unit writes its shard atomically (data layer ``write_shard``), then a small
atomic record ``.parts/<shard>.json`` (count, bytes, sha256, fingerprint). A re-run skips units
whose record matches the current fingerprint and whose file still has that size; everything else
is (re)done. The manifest (written last, by rank 0 after every rank finished) lists only units
with records, so a rank that dies never leaves a listed partial shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Callable, Optional

import numpy as np
import torch

from . import shards as sh

PARTS = ".parts"


def sample_seed(seed: int, key: str, k: int) -> int:
    h = hashlib.sha256(f"coupling_dist.pair_store:{seed}:{key}:{k}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_noise(seed: int, key: str, K: int, T: int, d: int) -> torch.Tensor:
    """eps [K, T, d] for one sample, identical whichever rank draws it."""
    out = torch.empty(K, T, d)
    for k in range(K):
        g = torch.Generator().manual_seed(sample_seed(seed, key, k))
        out[k] = torch.randn(T, d, generator=g)
    return out


def to_store_dtype(z: torch.Tensor, dtype: str) -> np.ndarray:
    """float16/float32 as is; bfloat16 as its uint16 bit pattern (numpy has no bfloat16)."""
    if dtype == "bfloat16":
        return z.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return z.to(getattr(torch, dtype)).cpu().numpy()


def from_store_dtype(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16" and t.dtype in (torch.uint16, torch.int16):
        return t.view(torch.bfloat16).float()
    return t.float()


sha256_file, _atomic_json = sh.sha256_file, sh.write_json_atomic


def fingerprint(artifact_hash: str, source_entry: dict, settings: dict) -> str:
    src = {k: source_entry.get(k) for k in ("name", "split", "count", "sha256")}
    blob = json.dumps({"artifact": artifact_hash, "source": src, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def record_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, PARTS, name + ".json")


def unit_done(out_dir: str, entry: dict, fp: str) -> Optional[dict]:
    """The unit's record if it is complete for this fingerprint, else None."""
    rp = record_path(out_dir, entry["name"])
    path = os.path.join(out_dir, entry["name"])
    if not (os.path.isfile(rp) and os.path.isfile(path)):
        return None
    try:
        with open(rp, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != fp or rec.get("bytes") != os.path.getsize(path):
        return None
    return rec


# Named with ray_launch.FAULT_PREFIX so that the launcher forwards it to Ray-actor ranks.
FAULT_ENV = "COUPLING_DIST_FAULT_PAIR_STORE"


def _fault_hook(rank: int, done: int) -> None:
    """Test-only crash injection: COUPLING_DIST_FAULT_PAIR_STORE="rank=R,after=N" makes rank R
    SIGKILL itself once it has finished N units (in the middle of the run, between an encode
    and the next write), so tests can check recovery from a rank that dies."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kv = dict(part.split("=", 1) for part in spec.split(","))
    if int(kv.get("rank", -1)) == rank and done >= int(kv.get("after", 0)):
        os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def encode_samples(model, samples: list[dict], *, seed: int, K: int, dtype: str, batch_size: int,
                   device="cpu") -> list[dict]:
    """Source samples (``__key__``, tokens, mask, features) -> pair samples (``__key__``, z, tokens, mask)."""
    out: list[dict] = []
    d = model.latent_dim
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        feats = torch.from_numpy(np.stack([s["features"] for s in chunk])).to(device)
        mask = torch.from_numpy(np.stack([s["mask"] for s in chunk])).to(device)
        T = mask.shape[1]
        eps = torch.stack([sample_noise(seed, s["__key__"], K, T, d) for s in chunk]).to(device)  # [B, K, T, d]
        zs = []
        for k in range(K):
            u = model.encode_latent(feats, mask, eps[:, k].to(model.proj.weight.dtype))
            zs.append(model.to_gaussian(u, mask).float())
        z = torch.stack(zs, dim=1)  # [B, K, T, d]
        zn = to_store_dtype(z, dtype)
        for j, s in enumerate(chunk):
            out.append({"__key__": s["__key__"], "z": zn[j], "tokens": np.asarray(s["tokens"]),
                        "mask": np.asarray(s["mask"])})
    return out


def run_rank(*, model, source_dir: str, plan: list[dict], out_dir: str, rank: int, world: int, seed: int,
             K: int, dtype: str, batch_size: int, artifact_hash: str, settings: dict, device="cpu",
             log: Optional[Callable[[str], None]] = None) -> dict:
    """Encode this rank's units (``plan[rank::world]``); return counts. Uses no collectives, so the
    same function serves torchrun/srun ranks and Ray actors."""
    os.makedirs(os.path.join(out_dir, PARTS), exist_ok=True)
    mine = plan[rank::world]
    done = skipped = samples = 0
    t0 = time.perf_counter()
    for entry in mine:
        fp = fingerprint(artifact_hash, entry, settings)
        if unit_done(out_dir, entry, fp) is not None:
            skipped += 1
            continue
        _fault_hook(rank, done)
        src = sh.read_shard(os.path.join(source_dir, entry["name"]))
        pairs = encode_samples(model, src, seed=seed, K=K, dtype=dtype, batch_size=batch_size, device=device)
        path = os.path.join(out_dir, entry["name"])
        sh.write_shard(path, pairs)
        rec = {"name": entry["name"], "split": entry["split"], "count": len(pairs),
               "bytes": os.path.getsize(path), "sha256": sha256_file(path), "fingerprint": fp,
               "source_sha256": entry.get("sha256")}
        _atomic_json(record_path(out_dir, entry["name"]), rec)
        done += 1
        samples += len(pairs)
        if log:
            log(f"rank {rank}: wrote {entry['name']} ({len(pairs)} pairs)")
    return {"rank": rank, "units": len(mine), "written": done, "skipped": skipped, "samples": samples,
            "seconds": time.perf_counter() - t0}

"""The per-rank work of the pair store: encode source shards into (z, tokens, mask) shards.

Work unit = one source shard -> one output shard of the same name (so the output mirrors the
source layout, splits included, and "is this unit done?" is a question about one file). Rank r of
W takes the units ``plan[r::W]``; no rank waits on another while working.

Determinism: the noise for sample ``key`` and latent k is drawn from a generator seeded by
sha256(seed, key, k), and batches are formed inside one source shard, so an output shard's bytes
depend only on (artifact, source shard, settings) -- not on the number of ranks or their order.

Completion: the resumable shard job (``data.shard_job``) writes each unit's shard, then its
sidecar record; a unit's fingerprint covers the artifact hash, the source shard and the settings.
A re-run skips done units and (re)does everything else. With ``pair_store.teacher_topk`` the
settings include the KD cache record (teacher identity, temperature, k), so changing the teacher
redoes every unit. The manifest (written last, by rank 0
after every rank finished) lists only done units, so a rank that dies never leaves a listed
partial shard.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Callable, Optional

import numpy as np
import torch

from ...components import faults
from ...data import shards as sh
from ...models.stage_a import source_of_samples
from ...data.dtypes import to_stored
from ...data.shard_job import ShardJob
from ...data.shard_job import fingerprint as unit_fingerprint
from ...models.teacher import cache_arrays


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


def fingerprint(artifact_hash: str, source_entry: dict, settings: dict) -> str:
    src = {k: source_entry.get(k) for k in ("name", "split", "count", "sha256")}
    return unit_fingerprint({"artifact": artifact_hash, "source": src, "settings": settings})


def units(plan: list[dict], artifact_hash: str, settings: dict) -> list[tuple[str, str]]:
    """(output shard name, fingerprint) of every unit."""
    return [(e["name"], fingerprint(artifact_hash, e, settings)) for e in plan]


@torch.no_grad()
def encode_samples(model, samples: list[dict], *, seed: int, K: int, dtype: str, batch_size: int,
                   device="cpu", teacher_cache: Optional[dict] = None, vocab=None, features=None) -> list[dict]:
    """Source samples (``__key__``, tokens, mask, features[, label]) -> pair samples (``__key__``, z,
    tokens, mask, the ``label`` [1] int16 when Stage A is class-conditional (z = NF(u; label)), and with ``teacher_cache`` = {model, k, temperature} the KD cache fields of
    ``models.teacher.cache_arrays``: the teacher sees the same batches whatever the rank count).
    ``features``: the online frozen encoder (tokens -> features) for token-only source shards."""
    out: list[dict] = []
    d = model.latent_dim
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        source = source_of_samples(model, chunk, vocab, device, features)
        mask = torch.from_numpy(np.stack([s["mask"] for s in chunk])).to(device)
        T = model.latent_len(mask.shape[1])  # latent positions (tokens / stage_a.patch)
        eps = torch.stack([sample_noise(seed, s["__key__"], K, T, d) for s in chunk]).to(device)  # [B, K, T, d]
        labels = sample_labels(model, chunk, device)
        zs = []
        for k in range(K):
            u = model.encode_latent(source, mask, eps[:, k].to(model.dtype))
            zs.append(model.to_gaussian(u, mask, labels).float())
        z = torch.stack(zs, dim=1)  # [B, K, T, d]
        zn = to_stored(z, dtype)
        cache = [{}] * len(chunk)
        if teacher_cache is not None:
            tokens = torch.from_numpy(np.stack([s["tokens"] for s in chunk]).astype(np.int64)).to(device)
            cache = cache_arrays(teacher_cache["model"], tokens, mask, teacher_cache["k"], teacher_cache["temperature"])
        for j, s in enumerate(chunk):
            label = {"label": np.asarray(s["label"], dtype=np.int16).reshape(1)} if labels is not None else {}
            out.append({"__key__": s["__key__"], "z": zn[j], "tokens": np.asarray(s["tokens"]),
                        "mask": np.asarray(s["mask"]), **label, **cache[j]})
    return out


def sample_labels(model, samples: list[dict], device) -> Optional[torch.Tensor]:
    """The true classes [B] of source samples for a class-conditional Stage A (z = NF(u; y)), else
    None. A sample without a ``label`` field names its key."""
    if not model.num_classes:
        return None
    missing = [s["__key__"] for s in samples if "label" not in s]
    if missing:
        raise sh.ShardError("?", missing[0], "the Stage A export is class-conditional (num_classes "
                            f"{model.num_classes}) but this source sample has no 'label' field")
    return torch.tensor([int(np.asarray(s["label"]).reshape(-1)[0]) for s in samples], dtype=torch.long,
                        device=device)


def run_rank(*, model, source_dir: str, plan: list[dict], out_dir: str, rank: int, world: int, seed: int,
             K: int, dtype: str, batch_size: int, artifact_hash: str, settings: dict, device="cpu",
             log: Optional[Callable[[str], None]] = None, teacher_cache: Optional[dict] = None, vocab=None,
             features=None) -> dict:
    """Encode this rank's units (``plan[rank::world]``); return counts. Uses no collectives, so the
    same function serves torchrun/srun ranks and Ray actors."""
    job = ShardJob(out_dir)
    mine = plan[rank::world]
    done = skipped = samples = 0
    t0 = time.perf_counter()
    for entry in mine:
        fp = fingerprint(artifact_hash, entry, settings)
        if job.done(entry["name"], fp) is not None:
            skipped += 1
            continue
        faults.point("pair_store.unit", rank=rank, done=done)
        src = sh.read_shard(os.path.join(source_dir, entry["name"]))
        pairs = encode_samples(model, src, seed=seed, K=K, dtype=dtype, batch_size=batch_size, device=device,
                               teacher_cache=teacher_cache, vocab=vocab, features=features)
        job.write(entry["name"], pairs, fp, split=entry["split"], source_sha256=entry.get("sha256"))
        done += 1
        samples += len(pairs)
        if log:
            log(f"rank {rank}: wrote {entry['name']} ({len(pairs)} pairs)")
    return {"rank": rank, "units": len(mine), "written": done, "skipped": skipped, "samples": samples,
            "seconds": time.perf_counter() - t0}

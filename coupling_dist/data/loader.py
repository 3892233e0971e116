"""Streaming loader over a shard set with an exact, world-size-independent order.

Order. The samples of a split are numbered 0..N-1 in manifest order (shards sorted by name,
samples in tar order). Epoch ``e`` visits them in the order of a pseudo-random permutation
``P_{seed,e}`` (a keyed Feistel network with cycle walking: a bijection of [0, N) computed per
index in O(1) memory, so no rank or worker ever materialises an N-sized array). Global batch
``step`` is positions ``P(j*B .. (j+1)*B-1)`` of epoch ``step // steps_per_epoch`` with
``j = step % steps_per_epoch``, ``steps_per_epoch = N // B`` (the last partial global batch is
dropped, so every rank gets the same number of batches). Rank ``r`` of ``W`` takes the
contiguous rows ``[r*B/W, (r+1)*B/W)``. Nothing depends on W or on the DataLoader workers, so
the loader's whole state is ``step``: resuming at step k (at any world size that divides B)
yields exactly the batches an uninterrupted run would have.

Reading. Each shard's member index (tar header offsets) is built on first use; samples are read
with ``os.pread`` + zstd + ``.npy`` decode. With ``num_workers > 0`` a torch DataLoader spreads
whole steps over worker processes (order preserved). Sizes are always checked against the
manifest at construction, sha256 on request; every array is checked against the manifest's
dtype and shape. Bad data raises ``ShardError`` naming the shard and sample key, unless
``skip_bad`` is set: then the sample is dropped from its batch, counted (``loader.skipped``) and
logged.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterator, Optional

import numpy as np
import torch

from ..components.logging import get_logger
from . import shards as S

log = get_logger("data.loader")
MAX_OPEN = 64
FIX = ("re-run the stage that wrote this shard set with the same config (preprocess or pair_store: only missing or "
       "damaged shards are rewritten), or set loader.skip_bad=true to skip the bad samples")


# --------------------------------------------------------------------------- the permutation

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arithmetic wraps, which is what we want)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _round_keys(seed: int, epoch: int, rounds: int) -> list:
    h = hashlib.sha256(f"coupling_dist.loader:{seed}:{epoch}".encode()).digest()
    return [np.uint64(int.from_bytes(h[4 * i:4 * i + 8], "little")) for i in range(rounds)]


def permute(idx: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 6) -> np.ndarray:
    """P_{seed,epoch}(idx) for idx in [0, n): a bijection of [0, n)."""
    idx = np.asarray(idx, dtype=np.uint64)
    if n <= 1:
        return np.zeros(idx.shape, dtype=np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)
    keys = _round_keys(seed, epoch, rounds)

    def feistel(x):
        left, right = x >> half, x & low
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & low)
        return (left << half) | right

    out = feistel(idx)
    todo = out >= np.uint64(n)
    while todo.any():  # cycle walking: stays a bijection on [0, n); < 4 rounds expected
        out[todo] = feistel(out[todo])
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


# --------------------------------------------------------------------------- the reader


class _Reader:
    """Reads samples by split position; picklable (caches are per process)."""

    def __init__(self, shard_dir: str, shards: list[dict], fields: list[str], specs: dict, bad: dict,
                 skip_bad: bool):
        self.shard_dir, self.shards, self.fields, self.specs = shard_dir, shards, fields, specs
        self.bad, self.skip_bad = dict(bad), skip_bad
        counts = np.array([int(s["count"]) for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self._index: dict = {}
        self._fds: OrderedDict = OrderedDict()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_index"], d["_fds"] = {}, OrderedDict()
        return d

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def _fd(self, name: str) -> int:
        if name in self._fds:
            self._fds.move_to_end(name)
            return self._fds[name]
        fd = os.open(os.path.join(self.shard_dir, name), os.O_RDONLY)
        self._fds[name] = fd
        if len(self._fds) > MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _shard_index(self, i: int) -> S.MemberIndex:
        if i not in self._index:
            s = self.shards[i]
            idx = S.index_shard(os.path.join(self.shard_dir, s["name"]))
            if len(idx) != int(s["count"]):
                last = idx.keys[-1] if idx.keys else None
                raise S.ShardError(s["name"], last, f"manifest lists {s['count']} samples but the file holds "
                                   f"{len(idx)} (last key shown); the manifest "
                                   f"{S.Manifest.path(self.shard_dir)} does not match the files: {FIX}")
            self._index[i] = idx
        return self._index[i]

    def locate(self, pos: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.starts, pos, side="right")) - 1
        return i, int(pos - self.starts[i])

    def key_of(self, pos: int) -> tuple[str, str]:
        i, off = self.locate(pos)
        name = self.shards[i]["name"]
        return name, (_key_hint(self.shards[i], off) if name in self.bad else self._shard_index(i).keys[off])

    def read(self, pos: int) -> dict:
        i, off = self.locate(pos)
        name = self.shards[i]["name"]
        if name in self.bad:
            raise S.ShardError(name, _key_hint(self.shards[i], off), self.bad[name])
        idx = self._shard_index(i)
        key = idx.keys[off]
        mem = idx.members[key]
        fd = self._fd(name)
        out = {"__key__": key}
        for fld in self.fields:
            if fld not in mem:
                raise S.ShardError(name, key, f"field '{fld}' is missing (has {sorted(mem)})")
            arr = S.decode_array(S.read_member(fd, *mem[fld], name, key, fld), name, key, fld)
            S.check_array(arr, self.specs.get(fld), name, key, fld)
            out[fld] = arr
        return out

    def batch(self, positions: np.ndarray, with_keys: bool = False) -> dict:
        rows, skipped = [], []
        for p in positions:
            try:
                rows.append(self.read(int(p)))
            except S.ShardError as e:
                if not self.skip_bad:
                    raise
                skipped.append(str(e))
        out = {}
        for fld in self.fields:
            spec = self.specs[fld]
            if rows:
                arr = np.stack([r[fld] for r in rows])
            else:
                arr = np.zeros((0, *spec["shape"]), dtype=S.stored_dtype(spec["dtype"]))
            t = torch.from_numpy(arr)
            out[fld] = t.view(torch.bfloat16) if spec["dtype"] == "bfloat16" else t
        if with_keys:
            out["__key__"] = [r["__key__"] for r in rows]
        out["__skipped__"] = skipped
        return out


def _key_hint(entry: dict, off: Optional[int] = None) -> Optional[str]:
    if off is not None and entry.get("first_key") and entry.get("last_key"):
        return f"#{off} (of keys {entry['first_key']}..{entry['last_key']})"
    if entry.get("first_key"):
        return f"{entry['first_key']}..{entry.get('last_key')}"
    return f"#{off}" if off is not None else None


def _diagnose(path: str) -> str:
    """For a shard whose size does not match: which sample key is the first damaged one."""
    try:
        idx = S.index_shard(path)
    except S.ShardError as e:
        return f"first damaged sample key {e.key}"
    return f"{len(idx)} samples readable, last key {idx.keys[-1] if idx.keys else None}"


def _identity(x):
    return x


class _StepDataset(torch.utils.data.Dataset):
    """DataLoader view: item ``step`` = this rank's slice of global batch ``step``."""

    def __init__(self, loader: "ShardLoader"):
        self.reader, self.rank_positions, self.with_keys = loader._reader, loader.rank_positions, loader.with_keys

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int) -> dict:
        try:
            return self.reader.batch(self.rank_positions(step), self.with_keys)
        except S.ShardError as e:  # handed to the main process as itself (DataLoader would re-wrap it)
            return {"__error__": e}


# --------------------------------------------------------------------------- the loader


class ShardLoader:
    def __init__(self, shard_dir: str, split: str, global_batch_size: int, seed: int, rank: int, world: int,
                 fields: Optional[list] = None, start_step: int = 0, verify_checksums: bool = False,
                 skip_bad: bool = False, num_workers: int = 0, prefetch: int = 2, with_keys: bool = False):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardLoader: rank {rank} is not in a world of {world}")
        if global_batch_size < world or global_batch_size % world:
            raise ValueError(f"ShardLoader: global batch {global_batch_size} must be a positive multiple of the "
                             f"world size {world} (each rank takes an equal contiguous slice)")
        self.shard_dir, self.split, self.seed = shard_dir, split, int(seed)
        self.global_batch_size, self.rank, self.world = int(global_batch_size), int(rank), int(world)
        self.local_batch_size = self.global_batch_size // self.world
        self.num_workers, self.prefetch, self.skip_bad = int(num_workers), int(prefetch), bool(skip_bad)
        self.with_keys = bool(with_keys)  # adds "__key__": list of sample keys (not a tensor) to each batch
        self.manifest = S.Manifest.load(shard_dir)
        where = S.Manifest.path(shard_dir)
        shards = self.manifest.split_shards(split)
        if not shards:
            raise S.ManifestError(f"{where}: no shards for split '{split}' (splits: {sorted(self.manifest.splits)})")
        self.fields = list(fields) if fields is not None else sorted(self.manifest.fields)
        unknown = [f for f in self.fields if f not in self.manifest.fields]
        if unknown:
            raise S.ManifestError(f"{where}: no field(s) {unknown} (fields: {sorted(self.manifest.fields)})")
        bad = self._verify(shards, verify_checksums)
        specs = {f: self.manifest.fields[f] for f in self.fields}
        self._reader = _Reader(shard_dir, shards, self.fields, specs, bad, self.skip_bad)
        self.num_samples = int(self._reader.starts[-1])
        self.steps_per_epoch = self.num_samples // self.global_batch_size
        if self.steps_per_epoch == 0:
            log.warning("%s split '%s' has %d samples, fewer than one global batch of %d: it yields no batches",
                        shard_dir, split, self.num_samples, self.global_batch_size)
        self.step = int(start_step)
        self.skipped = 0

    def _verify(self, shards: list[dict], checksums: bool) -> dict:
        """Sizes (and sha256) vs the manifest; returns {shard: reason} of bad shards (skip_bad only)."""
        bad = {}
        for s in shards:
            path = os.path.join(self.shard_dir, s["name"])
            reason = None
            if not os.path.isfile(path):
                reason = f"missing from disk ({path})"
            elif os.path.getsize(path) != int(s["bytes"]):
                reason = (f"manifest mismatch: {os.path.getsize(path)} bytes on disk, manifest says {s['bytes']} "
                          f"(truncated or replaced; {_diagnose(path)}; {path})")
            elif checksums and s.get("sha256") and S.sha256_file(path) != s["sha256"]:
                reason = f"manifest mismatch: sha256 differs from the manifest ({path})"
            if reason is None:
                continue
            if not self.skip_bad:
                raise S.ShardError(s["name"], _key_hint(s), f"{reason}; {FIX}")
            log.warning("shard %s: %s; its %s samples will be skipped (skip_bad)", s["name"], reason, s["count"])
            bad[s["name"]] = reason
        return bad

    # ------------------------------------------------------------------ order

    def global_positions(self, step: int) -> np.ndarray:
        """Split positions of global batch ``step`` (a pure function of seed, epoch, step)."""
        if self.steps_per_epoch == 0:
            return np.zeros(0, dtype=np.int64)
        epoch, j = divmod(int(step), self.steps_per_epoch)
        B = self.global_batch_size
        return permute(np.arange(j * B, (j + 1) * B), self.num_samples, self.seed, epoch)

    def rank_positions(self, step: int) -> np.ndarray:
        b = self.local_batch_size
        return self.global_positions(step)[self.rank * b:(self.rank + 1) * b]

    def keys(self, step: int, global_batch: bool = False) -> list[tuple[str, str]]:
        """(shard, key) of each row of this rank's (or the global) batch ``step``."""
        pos = self.global_positions(step) if global_batch else self.rank_positions(step)
        return [self._reader.key_of(int(p)) for p in pos]

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch if self.steps_per_epoch else 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        """This rank's batches from ``self.step`` to the end of the current epoch."""
        if self.steps_per_epoch == 0:
            return
        end = (self.step // self.steps_per_epoch + 1) * self.steps_per_epoch
        steps = range(self.step, end)
        if self.num_workers > 0:
            dl = torch.utils.data.DataLoader(_StepDataset(self), batch_size=None, sampler=steps,
                                             num_workers=self.num_workers, prefetch_factor=self.prefetch,
                                             collate_fn=_identity)
            source = iter(dl)
        else:
            source = (self._reader.batch(self.rank_positions(s), self.with_keys) for s in steps)
        for batch in source:
            if "__error__" in batch:
                raise batch["__error__"]
            for msg in batch.pop("__skipped__"):
                self.skipped += 1
                log.warning("skipped bad sample (%d so far): %s", self.skipped, msg)
            self.step += 1
            yield batch

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "split": self.split, "num_samples": self.num_samples, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "global_batch_size", "num_samples"):
            if k in state and int(state[k]) != int(getattr(self, k)):
                raise ValueError(f"ShardLoader state has {k}={state[k]} but this loader has {getattr(self, k)}: "
                                 f"step {state['step']} would mean different batches")
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))

    def close(self) -> None:
        self._reader.close()

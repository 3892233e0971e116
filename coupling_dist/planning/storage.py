"""Bytes on disk: shard sets (``data/shards.py``), training checkpoints and exports.

A shard is a USTAR tar whose members are zstd-compressed ``.npy`` arrays, one per (sample, field).
Each member costs a 512-byte header plus its payload rounded up to 512 bytes; the archive ends with
two zero blocks and is padded to tarfile's 10,240-byte record. At small widths the headers and
rounding dominate (a 32-token ``mask`` is 160 raw bytes and 1,024 on disk), at the paper's the
features do, so both are modelled rather than a flat compression ratio.

A field's payload is *measured* on an existing shard of the target set when one exists (the first
sample's arrays must have the planned dtype and shape), else estimated on stand-ins, compressed
with the shards' own codec: real tokenized corpus rows for ``tokens`` / ``mask`` when the corpus is
readable, Gaussian values in the stored dtype for float fields (the pair store's z is Gaussian by
construction; frozen-LM features compress like it to within ~1 % at the tiny widths we measured).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..data import shards as S

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile.RECORDSIZE
SIDECAR_BYTES = 400  # data.shard_job's .parts/<shard>.json record, per shard
MANIFEST_BYTES = (2000, 300)  # the manifest: its fixed part, and one entry per shard
STAND_IN_ROWS = 8
STAND_IN_LENGTH = 27  # tokens per sentence when no corpus row is readable (LM1B's mean is about 27)


def member_bytes(payload: float) -> int:
    return BLOCK + int(math.ceil(payload / BLOCK)) * BLOCK


def tar_bytes(members: float) -> int:
    return int(math.ceil((members + 2 * BLOCK) / RECORD)) * RECORD


@dataclass
class FieldSize:
    name: str
    dtype: str
    shape: tuple
    member: float  # mean bytes of this field's tar member (header + rounded payload)
    payload: float  # mean compressed payload
    source: str  # "measured on <shard>" or "stand-in ..."

    @property
    def raw(self) -> int:
        """The uncompressed ``.npy`` (its header included)."""
        return npy_header_bytes(self.shape, self.dtype) + int(np.prod(self.shape)) * S.stored_dtype(self.dtype).itemsize

    @property
    def ratio(self) -> float:
        return self.payload / max(1, self.raw)


def npy_header_bytes(shape: tuple, dtype: str) -> int:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(S.stored_dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return len(buf.getvalue())


def field_specs(manifest_fields: dict) -> dict:
    """{name: (dtype, shape)} from a manifest's ``fields`` section."""
    return {k: (v["dtype"], tuple(int(x) for x in v["shape"])) for k, v in manifest_fields.items()}


def _stored(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import torch

        from ..data.dtypes import to_stored

        return to_stored(torch.from_numpy(arr.astype(np.float32)), dtype)
    return arr.astype(S.stored_dtype(dtype))


def stand_in_arrays(name: str, dtype: str, shape: tuple, rows: int, vocab: int, rng) -> list[np.ndarray]:
    """Arrays like the field's (``rows`` of them) when no real ones exist yet."""
    if name == "teacher_ids":
        return [rng.integers(0, max(2, vocab), shape).astype(np.int32) for _ in range(rows)]
    if name == "teacher_logp":  # sorted log-probabilities per position
        return [np.sort(-np.abs(rng.standard_normal(shape)).cumsum(-1), -1)[..., ::-1].astype(np.float32)
                for _ in range(rows)]
    if np.dtype(S.stored_dtype(dtype)).kind == "f" or dtype == "bfloat16":
        return [_stored(rng.standard_normal(shape), dtype) for _ in range(rows)]
    raise ValueError(f"no stand-in for field {name!r} ({dtype})")


def token_rows(ids_rows: list[list[int]], T: int, eos: int, pad: int) -> tuple[list, list]:
    """(tokens, mask) arrays exactly as preprocess makes them: ids + EOS, truncated/padded to T."""
    toks, masks = [], []
    for ids in ids_rows:
        row = (list(ids) + [eos])[:T]
        t = np.full(T, pad, dtype=np.int32)
        t[:len(row)] = row
        m = np.zeros(T, dtype=np.uint8)
        m[:len(row)] = 1
        toks.append(t)
        masks.append(m)
    return toks, masks


def size_of(name: str, dtype: str, shape: tuple, arrays: list[np.ndarray], source: str) -> FieldSize:
    payloads = [len(S.encode_array(a)) for a in arrays]
    return FieldSize(name, dtype, shape, float(np.mean([member_bytes(p) for p in payloads])),
                     float(np.mean(payloads)), source)


def measure_shard(shard_dir: str, specs: dict) -> dict:
    """{field: FieldSize} measured on the first readable shard of ``shard_dir`` whose fields are
    exactly ``specs`` (names, dtypes, shapes); {} when there is none."""
    if not os.path.isdir(shard_dir):
        return {}
    names = sorted((f for f in os.listdir(shard_dir) if f.startswith("shard-") and f.endswith(".tar")),
                   key=lambda f: ("-train-" not in f, f))  # a full training shard first
    for name in names[:3]:
        path = os.path.join(shard_dir, name)
        try:
            idx = S.index_shard(path)
            if not idx.keys or set(idx.members[idx.keys[0]]) != set(specs):
                continue
            first = idx.members[idx.keys[0]]
            with open(path, "rb") as fh:
                for fld, (off, size) in first.items():
                    fh.seek(off)
                    arr = S.decode_array(fh.read(size), name, idx.keys[0], fld)
                    dtype, shape = specs[fld]
                    if arr.dtype != S.stored_dtype(dtype) or tuple(arr.shape) != tuple(shape):
                        raise ValueError(f"{fld}: {arr.dtype}{arr.shape} is not the planned {dtype}{shape}")
        except (S.ShardError, OSError, ValueError):
            continue
        out = {}
        for fld, (dtype, shape) in specs.items():
            sizes = [idx.members[k][fld][1] for k in idx.keys]
            out[fld] = FieldSize(fld, dtype, tuple(shape), float(np.mean([member_bytes(s) for s in sizes])),
                                 float(np.mean(sizes)), f"measured on {name}")
        return out
    return {}


def shard_counts(n: int, heldout_fraction: float, shard_size: int) -> list[int]:
    """Samples per shard, as preprocess cuts them (``stages/preprocess/plan.make_plan``); the pair
    store mirrors the source shards one to one."""
    n_held = 0 if heldout_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * heldout_fraction)))
    out = []
    for split_n in (n - n_held, n_held):
        full, rest = divmod(split_n, shard_size)
        out += [shard_size] * full + ([rest] if rest else [])
    return out


def shard_set_bytes(counts: list[int], per_sample: float) -> int:
    """A shard set: the tars, their sidecars, the manifest."""
    fixed, per_shard = MANIFEST_BYTES
    return sum(tar_bytes(c * per_sample) for c in counts) + len(counts) * (SIDECAR_BYTES + per_shard) + fixed


def checkpoint_bytes(params: int, precision: str, ema: bool) -> int:
    """One DeepSpeed checkpoint (all ranks together; ZeRO only splits it into files): the module in
    the training dtype, the optimizer's fp32 master weights and two Adam moments (12 bytes per
    parameter, measured: a ZeRO-2 fp32 checkpoint holds 16 bytes per parameter), and our EMA
    shards (fp32)."""
    return params * ((2 if precision == "bf16" else 4) + 12 + (4 if ema else 0))


def export_bytes(params: int, listed_ids: int = 0) -> int:
    """An export: ``model.safetensors`` in fp32 (the trainer gathers fp32 masters) and its
    ``config.json`` (~5 kB, plus the compact vocabulary's ids, one indented line each)."""
    return 4 * params + 5000 + 13 * listed_ids


def ids_json_bytes(n_ids: int) -> int:
    """``vocab.json``: the compact vocabulary's ids on one line (measured: 10.4 bytes per id at 8,057 ids)."""
    return 200 + int(10.5 * n_ids)


def existing_bytes(path: str) -> int:
    """Bytes already under ``path`` (a file or a directory tree); 0 when absent."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def human(n: Optional[float]) -> str:
    """Decimal units (a disk's size is sold in them): 6.9 TB = 6.9e12 bytes."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"

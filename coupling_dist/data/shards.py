"""The on-disk shard format (spec: ``data_shards/FORMAT.md``).

A shard set is a directory with ``manifest.json`` and WebDataset tar shards. Each sample is a
group of tar members ``{key}.{field}.npy.zst``: the zstd-compressed bytes of a ``.npy`` file
(``numpy.lib.format``, ``allow_pickle=False``), so a shard is readable with ``tar`` and
``zstd -d`` alone and never executes anything when loaded.

Writing is byte-deterministic (sorted members, fixed mtime/uid/gid/names/mode, USTAR headers,
single-threaded zstd at a fixed level): the same samples always give the same file, which is
what lets a re-run restore a deleted shard byte-identically. Every write goes to a temporary
name beside the target and is renamed into place; the manifest is written last.

Every read error names the shard and the sample key (``ShardError``); it and ``ManifestError``
are ``InputError``s (exit status 2, one line).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import zstandard

from ..components.atomic import write_bytes, write_json
from ..components.preflight import InputError

FORMAT = "coupling_dist.shards/1"
SUFFIX = ".npy.zst"
ZSTD_LEVEL = 3
MTIME = 0  # fixed header fields: same samples -> same bytes
MANIFEST = "manifest.json"
# numpy has no bfloat16: such arrays are stored as their uint16 bit patterns (FORMAT.md).
STORED_DTYPE = {"bfloat16": "uint16"}


class ShardError(InputError):
    """A shard (or one of its samples) cannot be read or does not match the manifest."""

    def __init__(self, shard: str, key: Optional[str], msg: str):
        self.shard, self.key, self.msg = shard, key, msg
        where = f"shard {shard}" + (f", sample key {key}" if key is not None else "")
        super().__init__(f"{where}: {msg}")

    def __reduce__(self):  # crosses process boundaries (DataLoader workers, Ray) intact
        return (ShardError, (self.shard, self.key, self.msg))


class ManifestError(InputError, ValueError):
    """A manifest is missing, unreadable, or does not describe the files beside it."""


def shard_name(split: str, index: int) -> str:
    return f"shard-{split}-{index:05d}.tar"


def stored_dtype(dtype: str) -> np.dtype:
    return np.dtype(STORED_DTYPE.get(dtype, dtype))


# --------------------------------------------------------------------------- member codec


def encode_array(arr: np.ndarray, level: int = ZSTD_LEVEL) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    # threads=0 (the default) keeps the frame bytes deterministic; the checksum lets zstd -d
    # and our reader detect a corrupted frame instead of returning garbage.
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(buf.getvalue())


def decode_array(data: bytes, shard: str = "?", key: Optional[str] = None, fld: str = "?") -> np.ndarray:
    try:
        raw = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as e:
        raise ShardError(shard, key, f"field '{fld}': corrupted zstd frame ({e})") from None
    try:
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ShardError(shard, key, f"field '{fld}': not a valid .npy array ({e})") from None


def _check_field_name(key: str, fld: str) -> None:
    if "." in key or "/" in key or not key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    if "." in fld or "/" in fld or not fld:
        raise ValueError(f"sample {key}: field name {fld!r} must be non-empty without '.' or '/'")


# --------------------------------------------------------------------------- writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, MTIME, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def shard_bytes(samples: Iterable[dict], level: int = ZSTD_LEVEL) -> bytes:
    """The deterministic tar bytes for ``samples`` (dicts with ``__key__`` and numpy arrays)."""
    items = []
    for s in samples:
        key = str(s["__key__"])
        for fld in sorted(k for k in s if k != "__key__"):
            _check_field_name(key, fld)
            arr = s[fld]
            if not isinstance(arr, np.ndarray):
                arr = np.asarray(arr)
            if arr.dtype == object:
                raise ValueError(f"sample {key}: field '{fld}' has dtype object (shards never hold pickles)")
            items.append((f"{key}.{fld}{SUFFIX}", encode_array(arr, level)))
    items.sort(key=lambda kv: kv[0])
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate sample keys in one shard")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in items:
            tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def write_shard(path: str, samples: Iterable[dict], level: int = ZSTD_LEVEL) -> dict:
    """Write one shard atomically; returns {name, count, bytes, sha256}."""
    samples = list(samples)
    data = shard_bytes(samples, level)
    write_bytes(path, data)
    return {"name": os.path.basename(path), "count": len(samples), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


@dataclass
class MemberIndex:
    """Where each sample's members live in a shard: keys in tar order, and per key
    ``{field: (offset_data, size)}``. Built from the tar headers alone (no payload reads)."""

    keys: list
    members: dict

    def __len__(self) -> int:
        return len(self.keys)


def index_shard(path: str) -> MemberIndex:
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ShardError(name, None, f"missing from disk ({path})")
    keys: list = []
    members: dict = {}
    last = None
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                ti = tf.next()
                if ti is None:
                    break
                last = ti.name
                if not ti.isfile():
                    continue
                if not ti.name.endswith(SUFFIX) or "." not in ti.name:
                    raise ShardError(name, ti.name.split(".", 1)[0], f"unexpected member '{ti.name}'")
                key, fld = ti.name[: -len(SUFFIX)].split(".", 1)
                if key not in members:
                    members[key] = {}
                    keys.append(key)
                members[key][fld] = (ti.offset_data, ti.size)
                if ti.offset_data + ti.size > os.path.getsize(path):
                    raise ShardError(name, key, f"truncated tar: member '{ti.name}' ends past the end of the file")
            end = tf.offset
        # tarfile stops silently when the file ends on a header boundary or inside a header;
        # a complete archive has a zero end-of-archive block there.
        with open(path, "rb") as fh:
            fh.seek(end)
            blk = fh.read(tarfile.BLOCKSIZE)
        if len(blk) != tarfile.BLOCKSIZE or blk.count(0) != tarfile.BLOCKSIZE:
            raise ShardError(name, keys[-1] if keys else None,
                             "truncated tar: no end-of-archive block after this sample (the file was cut short)")
    except tarfile.TarError as e:
        after = last.split(".", 1)[0] if last else None
        raise ShardError(name, after, f"truncated or damaged tar after member {last!r} ({e})") from None
    return MemberIndex(keys, members)


def read_member(fd: int, offset: int, size: int, shard: str, key: str, fld: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ShardError(shard, key, f"field '{fld}': truncated tar (read {len(data)} of {size} bytes)")
    return data


def check_array(arr: np.ndarray, spec: Optional[dict], shard: str, key: str, fld: str) -> None:
    """Compare a decoded array with the manifest's field spec (dtype name + shape)."""
    if not spec:
        return
    want = stored_dtype(spec["dtype"])
    if arr.dtype != want:
        raise ShardError(shard, key, f"field '{fld}': dtype {arr.dtype} but the manifest says {spec['dtype']}")
    if list(arr.shape) != list(spec["shape"]):
        raise ShardError(shard, key, f"field '{fld}': shape {list(arr.shape)} but the manifest says {list(spec['shape'])}")


def read_shard(path: str, fields: Optional[list] = None, specs: Optional[dict] = None) -> list[dict]:
    """All samples of one shard, in tar order: ``[{"__key__": key, field: ndarray, ...}]``.
    ``fields`` limits what is decoded; ``specs`` ({field: {dtype, shape}}) checks each array."""
    name = os.path.basename(path)
    idx = index_shard(path)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for key in idx.keys:
            mem = idx.members[key]
            want = fields if fields is not None else sorted(mem)
            smp = {"__key__": key}
            for fld in want:
                if fld not in mem:
                    raise ShardError(name, key, f"field '{fld}' is missing (has {sorted(mem)})")
                arr = decode_array(read_member(fd, *mem[fld], name, key, fld), name, key, fld)
                check_array(arr, (specs or {}).get(fld), name, key, fld)
                smp[fld] = arr
            out.append(smp)
    finally:
        os.close(fd)
    return out


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """``manifest.json``: what a shard set holds and how to verify it (FORMAT.md)."""

    kind: str  # "preprocess" | "pair_store" | ...
    seq_len: int
    fields: dict  # {field: {"dtype": str, "shape": [..]}}
    shards: list  # [{"name", "split", "count", "bytes", "sha256", ...}]
    tokenizer: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # kind-specific (settings, fingerprints, stats)
    format: str = FORMAT

    REQUIRED = ("format", "kind", "seq_len", "fields", "shards")

    # ------------------------------------------------------------------ queries

    def split_shards(self, split: str) -> list[dict]:
        return sorted((s for s in self.shards if s["split"] == split), key=lambda s: s["name"])

    @property
    def splits(self) -> dict:
        out: dict = {}
        for s in self.shards:
            out[s["split"]] = out.get(s["split"], 0) + int(s["count"])
        return out

    def num_samples(self, split: Optional[str] = None) -> int:
        return sum(int(s["count"]) for s in self.shards if split is None or s["split"] == split)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update(format=self.format, kind=self.kind, seq_len=self.seq_len, fields=self.fields,
                 tokenizer=self.tokenizer, encoder=self.encoder,
                 shards=sorted(self.shards, key=lambda s: s["name"]), splits=self.splits,
                 num_samples=self.num_samples())
        return d

    @staticmethod
    def path(dir_or_file: str) -> str:
        return dir_or_file if dir_or_file.endswith(".json") else os.path.join(dir_or_file, MANIFEST)

    def save(self, dir_or_file: str) -> str:
        path = self.path(dir_or_file)
        d = self.to_dict()
        d["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(path, d)
        return path

    @classmethod
    def from_dict(cls, d: dict, where: str = "<manifest>") -> "Manifest":
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing key(s) {missing}")
        if d["format"] != FORMAT:
            raise ManifestError(f"{where}: format {d['format']!r} is not {FORMAT!r}")
        for i, s in enumerate(d["shards"]):
            for k in ("name", "split", "count", "bytes"):
                if k not in s:
                    raise ManifestError(f"{where}: shards[{i}] has no '{k}'")
        for fld, spec in d["fields"].items():
            if not isinstance(spec, dict) or "dtype" not in spec or "shape" not in spec:
                raise ManifestError(f"{where}: fields.{fld} needs 'dtype' and 'shape'")
        known = {"format", "kind", "seq_len", "fields", "shards", "tokenizer", "encoder", "splits",
                 "num_samples", "created"}
        return cls(kind=d["kind"], seq_len=int(d["seq_len"]), fields=d["fields"], shards=list(d["shards"]),
                   tokenizer=d.get("tokenizer") or {}, encoder=d.get("encoder") or {},
                   extra={k: v for k, v in d.items() if k not in known}, format=d["format"])

    @classmethod
    def load(cls, dir_or_file: str) -> "Manifest":
        path = cls.path(dir_or_file)
        if not os.path.isfile(path):
            raise ManifestError(f"{path}: no manifest (run preprocess first, or check data.out_dir)")
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, ValueError) as e:
            raise ManifestError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(d, dict):
            raise ManifestError(f"{path}: top level must be an object")
        return cls.from_dict(d, path)

    @classmethod
    def for_pairs(cls, out_dir: str, records: list[dict], *, fields: dict, seq_len: int, tokenizer: dict,
                  encoder: dict, extra: Optional[dict] = None) -> "Manifest":
        """A manifest for shards written elsewhere (e.g. the pair store) from their records
        ({name, split, count, bytes, sha256, ...}); sizes are checked against the files."""
        extra = dict(extra or {})
        kind = extra.pop("kind", "pair_store")
        shards = []
        for r in records:
            path = os.path.join(out_dir, r["name"])
            if not os.path.isfile(path) or os.path.getsize(path) != int(r["bytes"]):
                raise ManifestError(f"{Manifest.path(out_dir)}: shard {r['name']} is missing or not "
                                    f"{r['bytes']} bytes; not writing a manifest that does not match")
            shards.append({k: r[k] for k in ("name", "split", "count", "bytes", "sha256") if k in r})
        return cls(kind=kind, seq_len=int(seq_len), fields=fields, shards=shards, tokenizer=tokenizer or {},
                   encoder=encoder or {}, extra=extra)

    def verify(self, shard_dir: str, checksums: bool = False, names: Optional[list] = None) -> list[str]:
        """Problems (one line each, naming the shard) between the manifest and the files."""
        problems = []
        for s in self.shards:
            if names is not None and s["name"] not in names:
                continue
            p = os.path.join(shard_dir, s["name"])
            if not os.path.isfile(p):
                problems.append(f"shard {s['name']}: missing from disk ({p})")
            elif os.path.getsize(p) != int(s["bytes"]):
                problems.append(f"shard {s['name']}: {os.path.getsize(p)} bytes on disk, manifest says {s['bytes']}")
            elif checksums and s.get("sha256") and sha256_file(p) != s["sha256"]:
                problems.append(f"shard {s['name']}: sha256 differs from the manifest")
        return problems


def iter_shards(shard_dir: str, split: Optional[str] = None, fields: Optional[list] = None) -> Iterator[list[dict]]:
    """The samples of every shard its manifest lists (name order; only ``split``'s when given), one
    list per shard: for the small readers that scan a whole shard set (vocabulary, marginals,
    reports), not for training (``data.loader``)."""
    for s in sorted(Manifest.load(shard_dir).shards, key=lambda s: s["name"]):
        if split is None or s["split"] == split:
            yield read_shard(os.path.join(shard_dir, os.path.basename(s["name"])), fields=fields)

"""The one resumable shard job: output shards that are finished one by one and never rewritten.

Used by preprocessing (one shard per slice of the corpus) and by the pair store (one output shard
per source shard). A *unit* is one output shard with a *fingerprint*: a hash of everything that
determines its bytes (``fingerprint(obj)``). Writing a unit puts the shard in place atomically,
then its sidecar ``.parts/<shard>.json`` (the record: name, split, count, bytes, sha256,
fingerprint, and what the caller adds) -- the sidecar is the "done" marker. A unit is *done* when
both files exist, the sidecar carries the current fingerprint, and the file still has the
recorded size (and sha256 with ``verify="sha256"``). A re-run therefore redoes only what is
missing, stale or damaged, and the caller writes the manifest -- last -- only when ``collect``
finds every unit done, so a crash never leaves a listed partial shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

from ..components.atomic import write_json
from ..components.logging import get_logger
from . import shards as S

log = get_logger("data.shard_job")
PARTS = ".parts"


def fingerprint(obj) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def sidecar_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, PARTS, name + ".json")


class ShardJob:
    def __init__(self, out_dir: str, verify: str = "size"):
        if verify not in ("size", "sha256"):
            raise ValueError(f"verify must be size|sha256, not {verify!r}")
        self.out_dir, self.verify = out_dir, verify

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def sidecar(self, name: str) -> str:
        return sidecar_path(self.out_dir, name)

    def done(self, name: str, fp: str) -> Optional[dict]:
        """The unit's record if its shard is finished for fingerprint ``fp``, else None."""
        path, side = self.path(name), self.sidecar(name)
        if not (os.path.isfile(path) and os.path.isfile(side)):
            return None
        try:
            with open(side, encoding="utf-8") as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            return None
        if rec.get("fingerprint") != fp or rec.get("bytes") != os.path.getsize(path):
            return None
        if self.verify == "sha256" and S.sha256_file(path) != rec.get("sha256"):
            log.warning("shard %s does not match its sidecar's sha256: it will be rewritten", name)
            return None
        return rec

    def write(self, name: str, samples: list[dict], fp: str, **extra) -> dict:
        """Write the shard, then its sidecar; return the record."""
        return self.mark_done(self.write_shard(name, samples), fp, **extra)

    def write_shard(self, name: str, samples: list[dict]) -> dict:
        """Step 1 of ``write``: the shard alone (not done yet); returns {name, count, bytes, sha256}."""
        return S.write_shard(self.path(name), samples)

    def mark_done(self, rec: dict, fp: str, **extra) -> dict:
        """Step 2 of ``write``: the sidecar for a written shard's record (plus ``extra`` fields)."""
        rec = dict(rec, **extra, fingerprint=fp)
        write_json(self.sidecar(rec["name"]), rec)
        return rec

    def collect(self, units: Iterable[tuple[str, str]]) -> tuple[dict, list[str]]:
        """({name: record} of the done units, [names not done]) for (name, fingerprint) pairs."""
        records, missing = {}, []
        for name, fp in units:
            rec = self.done(name, fp)
            if rec is None:
                missing.append(name)
            else:
                records[name] = rec
        return records, missing

    def sweep_temporaries(self) -> None:
        """Remove temp files of interrupted writes (``components.atomic`` names). Only while no
        writer is running: a driver calls it before starting its workers."""
        for f in os.listdir(self.out_dir):
            if f.startswith(".") and ".tmp." in f and os.path.isfile(self.path(f)):
                os.remove(self.path(f))

"""The compact vocabulary (``data.vocab: corpus``): output heads over the token ids a shard set uses.

The tokenizers' vocabularies (49k-152k) dominate every CPU step at demo widths, while a small
corpus uses a few thousand ids. With ``data.vocab: corpus`` the Stage A decoder head and the
Stage B generator head cover only the sorted ids that occur in the shard set -- every split, so
held-out reconstruction and evaluation never meet an id the head lacks -- plus EOS and pad. Head
row ``i`` is tokenizer id ``ids[i]``; the exports record ``ids`` so that samplers map back and
sample files / evaluation see tokenizer ids as before.

The list is cached as ``vocab.json`` beside the shard set's manifest, together with the sha256 of
that manifest (the shard set's identity: it lists every shard's checksum), so a rebuilt shard set
never reuses a stale list. ``data.vocab: full`` (the default, and the paper config) bypasses all
of this.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import torch

from ..components.atomic import write_json

VOCAB_FILE = "vocab.json"
FORMAT = "coupling_dist.vocab/1"


class CompactVocab:
    """A sorted list of tokenizer ids: ``to_compact`` / ``to_full`` map between the two id spaces."""

    def __init__(self, ids: Sequence[int], full_size: int):
        ids = sorted(set(int(i) for i in ids))
        if not ids or ids[0] < 0 or ids[-1] >= int(full_size):
            raise ValueError(f"compact vocabulary ids must lie in [0, {full_size}), got {ids[:1]}..{ids[-1:]}")
        self.ids, self.full_size = ids, int(full_size)
        self._full = torch.tensor(ids, dtype=torch.long)
        # full id -> compact id, -1 where the id is outside the list (a lookup, not a search)
        self._table = torch.full((self.full_size,), -1, dtype=torch.long)
        self._table[self._full] = torch.arange(len(ids))

    @property
    def size(self) -> int:
        return len(self.ids)

    def to_compact(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids (any shape) -> compact ids; an id outside the list raises, naming it (a
        silent wrong target would train the wrong token)."""
        t = tokens.long()
        table = self._table.to(t.device)
        bad = (t < 0) | (t >= self.full_size)
        out = table[t.clamp(0, self.full_size - 1)]
        bad |= out < 0
        if bool(bad.any()):
            raise ValueError(f"token id {int(t[bad].flatten()[0])} is not in the compact vocabulary "
                             f"({self.size} ids built from the shard set); rebuild it for these shards")
        return out

    def to_full(self, ids: torch.Tensor) -> torch.Tensor:
        """Compact ids (any shape) -> tokenizer ids."""
        t = ids.long()
        if bool(((t < 0) | (t >= self.size)).any()):
            raise ValueError(f"compact id out of range [0, {self.size}): {int(t.max())}")
        return self._full.to(t.device)[t]

    def restrict(self, weight: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """[V_full, H] head matrix -> its rows for the compact ids, [size, H] (zero rows appended up
        to ``rows``: the padding a TP-divisible head carries)."""
        out = weight[self._full.to(weight.device)]
        if rows is not None and rows > self.size:
            out = torch.cat([out, out.new_zeros(rows - self.size, out.shape[1])])
        return out

    def to_meta(self) -> dict:
        return {"ids": self.ids, "full_size": self.full_size}

    @classmethod
    def from_meta(cls, d: Optional[dict]) -> Optional["CompactVocab"]:
        """What an export recorded (``vocab`` key), or None for a full-vocabulary export."""
        return None if not d else cls(d["ids"], d["full_size"])


def shard_set_identity(data_dir: str) -> str:
    from .shards import Manifest

    with open(Manifest.path(data_dir), "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def build_vocab(data_dir: str) -> CompactVocab:
    """The ids in every shard (all splits) of ``data_dir``, plus the tokenizer's EOS and pad; read
    from ``vocab.json`` when it was built for this very shard set, else built and cached."""
    from .shards import Manifest, iter_shards

    man = Manifest.load(data_dir)
    tok = man.tokenizer or {}
    if not tok.get("vocab_size"):
        raise ValueError(f"{Manifest.path(data_dir)}: manifest names no tokenizer vocab_size")
    ident = shard_set_identity(data_dir)
    cache = os.path.join(data_dir, VOCAB_FILE)
    if os.path.isfile(cache):
        with open(cache, encoding="utf-8") as fh:
            d = json.load(fh)
        if d.get("format") == FORMAT and d.get("shard_set") == ident:
            return CompactVocab(d["ids"], d["full_size"])
    seen = torch.zeros(int(tok["vocab_size"]), dtype=torch.bool)
    for samples in iter_shards(data_dir, fields=["tokens"]):
        for smp in samples:
            seen[torch.from_numpy(smp["tokens"]).long()] = True
    for special in (tok.get("eos_id"), tok.get("pad_id")):
        if special is not None:
            seen[int(special)] = True
    vocab = CompactVocab(seen.nonzero().flatten().tolist(), int(tok["vocab_size"]))
    # every rank may build it at once: the atomic write makes the last identical copy win
    write_json(cache, dict(vocab.to_meta(), format=FORMAT, shard_set=ident))
    return vocab


def vocab_for(cfg, data_dir: str) -> Optional[CompactVocab]:
    """The compact vocabulary of ``data_dir`` when ``data.vocab`` is ``corpus``, else None (full)."""
    return build_vocab(data_dir) if cfg.data.vocab == "corpus" else None

"""What an evaluation protocol scores for each sample record, and the length statistics.

Sample records (``sampling/generate.py``) carry ``ids`` (generator ids before the first EOS), ``eos``
(whether an EOS was generated) and ``all_ids`` (all T generated ids). Records without
``all_ids`` (real text, foreign files) are completed as the data is stored: ids, EOS, pads to T.

- ``mdlm``: the record's text (ids before the first EOS, decoded) and ``ids`` for entropy.
- ``paper`` (the paper's released ``eval.py``/``decode_tokens``): every pad id removed from the
  T generated ids, the rest decoded with special tokens skipped (so, as there, text generated
  after an EOS is kept and only the special tokens vanish); entropy over all T ids
  (pads included), in bits. Truncation at 256 scorer tokens and no appended EOS are the
  scorer's part (``scorer.text_chunks``).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence


def full_ids(record: dict, eos_id: int, pad_id: int, seq_len: int) -> list[int]:
    """The record's T generated ids (rebuilt as ids + EOS + pads when the record has none)."""
    if record.get("all_ids") is not None:
        return list(record["all_ids"])
    ids = list(record.get("ids") or [])[: seq_len - 1]
    return (ids + [eos_id] + [pad_id] * seq_len)[:seq_len]


def protocol_inputs(records: Sequence[dict], protocol: str, tok, seq_len: int) -> tuple[list[str], list]:
    """(texts to score, generator ids for entropy) of ``records`` under ``protocol``."""
    if protocol != "paper":
        return [r["text"] for r in records], [r.get("ids") for r in records]
    eos, pad = int(tok.eos_token_id), int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    texts, ids = [], []
    for r in records:
        if r.get("ids") is None and r.get("all_ids") is None:  # plain text without ids: as it is
            texts.append(r["text"])
            ids.append(None)
            continue
        full = full_ids(r, eos, pad, seq_len)
        texts.append(tok.decode([i for i in full if i != pad], skip_special_tokens=True))
        ids.append(full)
    return texts, ids


def lengths(records: Sequence[dict]) -> list[int]:
    """Generated tokens before the first EOS, per record (records without ids are skipped)."""
    return [len(r["ids"]) for r in records if r.get("ids") is not None]


def total_variation(a: Sequence[int], b: Sequence[int]) -> Optional[float]:
    """TV distance between the empirical distributions of two integer samples."""
    if not a or not b:
        return None
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in set(ca) | set(cb))


def length_stats(records: Sequence[dict], reference_lengths: Optional[Sequence[int]]) -> dict:
    """``no_eos_fraction`` (samples that never emitted EOS) and ``length_tv`` (TV distance of the
    length distribution to the reference's; None without a reference)."""
    flags = [r.get("eos") for r in records if r.get("eos") is not None]
    ls = lengths(records)
    return {"no_eos_fraction": (sum(1 for f in flags if not f) / len(flags)) if flags else None,
            "length_tv": total_variation(ls, list(reference_lengths or [])),
            "mean_gen_length": sum(ls) / len(ls) if ls else None}

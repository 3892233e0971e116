"""Causal-LM scoring of generated text: Gen-PPL, unigram entropy, distinct-n, lengths.

Texts are re-tokenized with the *scorer's* tokenizer. Gen-PPL = exp(sum of NLLs / number of
scored tokens) over the whole set (token-weighted), and the first token of every scored
sequence is never scored (nothing predicts it). Two named protocols:

- ``mdlm`` (MDLM/DUO's released code): scorer tokens of the text followed by the scorer's EOS;
  scored tokens are the non-EOS tokens plus the first EOS (``(tok != eos) | (cumsum(eos) == 1)``
  inside each chunk); sequences longer than the scorer's context are cut into chunks of that
  length, each scored on its own; unigram entropy in nats.
- ``paper`` (the Coupling Models paper's released evaluation): the text's scorer tokens truncated
  at 256, no EOS appended, every token after the first scored; unigram entropy in bits.

Entropy is computed per sample over the *generator's* token ids (the ``ids`` of a sample record;
the scorer tokens when a record has none) and averaged over samples. distinct-n is corpus-level
(unique n-grams / all n-grams) over the same ids.

Determinism: work is cut into chunks, chunks sorted by length (stable, so equal lengths keep
text order) and grouped into fixed batches before any scheduling, so the padding and shapes every
chunk sees do not depend on how many workers score the batches; per-text sums are accumulated in
fp64 and combined in text order.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Optional, Sequence

import torch

PROTOCOLS = ("mdlm", "paper")
PAPER_MAX_TOKENS = 256


# --------------------------------------------------------------------------- loading
# The scorer and its tokenizer load with ``components.assets.load_causal_lm`` / ``load_tokenizer``
# (directories, hub ids and GGUF files alike).


def context_length(model_or_config) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 1:
            return v
    return 1024


# --------------------------------------------------------------------------- chunks


def text_chunks(text: str, tok, protocol: str, max_len: int) -> list[list[int]]:
    """The scorer token sequences of one text (each scored separately, first token unscored)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (known: {PROTOCOLS})")
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if protocol == "paper":
        return [ids[:PAPER_MAX_TOKENS]]
    ids = ids + [int(tok.eos_token_id)]
    return [ids[i:i + max_len] for i in range(0, len(ids), max_len)]


def plan_batches(chunks: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """Chunk indices grouped into batches of similar length (stable sort by length, descending)."""
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_chunk_batch(model, chunks: Sequence[list[int]], eos_id: int, protocol: str,
                      device="cpu") -> list[tuple[float, int]]:
    """(NLL sum in fp64, number of scored tokens) per chunk; one padded forward pass."""
    L = max(len(c) for c in chunks)
    if L < 2:
        return [(0.0, 0) for _ in chunks]
    ids = torch.full((len(chunks), L), int(eos_id), dtype=torch.long)
    att = torch.zeros((len(chunks), L), dtype=torch.long)
    for r, c in enumerate(chunks):
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        att[r, :len(c)] = 1
    ids, att = ids.to(device), att.to(device)
    logits = model(input_ids=ids, attention_mask=att).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    w = att[:, 1:].bool()
    if protocol == "mdlm":
        is_eos = ids == eos_id
        first_eos = (is_eos.long().cumsum(-1) == 1) & is_eos
        w = w & ((~is_eos) | first_eos)[:, 1:]
    nll = torch.where(w, nll, torch.zeros_like(nll)).double()
    return [(float(nll[r].sum()), int(w[r].sum())) for r in range(len(chunks))]


# --------------------------------------------------------------------------- metrics


def unigram_entropy(ids: Sequence[int], base: float = math.e) -> float:
    if not ids:
        return 0.0
    n = len(ids)
    h = -sum((c / n) * math.log(c / n) for c in Counter(ids).values())
    return h / math.log(base)


def distinct_n(seqs: Iterable[Sequence[int]], n: int) -> float:
    seen, total = set(), 0
    for s in seqs:
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def aggregate(per_text: Sequence[dict], protocol: str) -> dict:
    """Combine per-text results (in the given order) into the set's metrics."""
    nll = math.fsum(r["nll"] for r in per_text)
    count = sum(r["count"] for r in per_text)
    base = 2.0 if protocol == "paper" else math.e
    gen_ids = [r["gen_ids"] for r in per_text]
    ent = [unigram_entropy(g, base) for g in gen_ids]
    out = {
        "protocol": protocol,
        "num_texts": len(per_text),
        "scored_tokens": count,
        "nll_sum": nll,
        "mean_nll": nll / count if count else float("nan"),
        "gen_ppl": math.exp(nll / count) if count else float("nan"),
        "entropy": sum(ent) / len(ent) if ent else float("nan"),
        "entropy_unit": "bits" if protocol == "paper" else "nats",
        "mean_length": sum(len(g) for g in gen_ids) / len(gen_ids) if gen_ids else 0.0,
        "mean_scorer_tokens": sum(r["scorer_tokens"] for r in per_text) / len(per_text) if per_text else 0.0,
    }
    for n in (1, 2, 3, 4):
        out[f"distinct_{n}"] = distinct_n(gen_ids, n)
    return out


class ScoringPlan:
    """Texts -> scorer chunks -> fixed batches; then per-batch results -> per-text results."""

    def __init__(self, texts: Sequence[str], gen_ids: Sequence[Optional[Sequence[int]]], tok, protocol: str,
                 max_len: int, batch_size: int):
        self.protocol = protocol
        self.eos_id = int(tok.eos_token_id)
        self.chunks: list[list[int]] = []
        self.owner: list[int] = []
        self.scorer_tokens: list[int] = []
        self.gen_ids: list[list[int]] = []
        for t, (text, g) in enumerate(zip(texts, gen_ids)):
            cs = text_chunks(text, tok, protocol, max_len)
            self.chunks.extend(cs)
            self.owner.extend([t] * len(cs))
            self.scorer_tokens.append(sum(len(c) for c in cs))
            # Without generator ids (foreign sample files) the scorer tokens stand in for entropy.
            self.gen_ids.append(list(g) if g is not None else [i for c in cs for i in c if i != self.eos_id])
        self.batches = plan_batches(self.chunks, batch_size)

    def batch_payloads(self) -> list[tuple[int, list[list[int]]]]:
        return [(b, [self.chunks[i] for i in idx]) for b, idx in enumerate(self.batches)]

    def per_text(self, batch_results: dict[int, list[tuple[float, int]]]) -> list[dict]:
        res: list[Optional[tuple[float, int]]] = [None] * len(self.chunks)
        for b, idx in enumerate(self.batches):
            for i, r in zip(idx, batch_results[b]):
                res[i] = r
        out = [{"nll": 0.0, "count": 0, "scorer_tokens": n, "gen_ids": g} for n, g in zip(self.scorer_tokens, self.gen_ids)]
        parts: list[list[float]] = [[] for _ in out]
        for i, (nll, cnt) in enumerate(res):  # chunk order within a text = its position order
            parts[self.owner[i]].append(nll)
            out[self.owner[i]]["count"] += cnt
        for o, p in zip(out, parts):
            o["nll"] = math.fsum(p)
        return out


def score_local(model, tok, texts: Sequence[str], gen_ids=None, protocol: str = "mdlm", batch_size: int = 16,
                device="cpu") -> dict:
    """Single-process scoring with the same plan as the actor pool (reference path, and the tests)."""
    gen_ids = gen_ids if gen_ids is not None else [None] * len(texts)
    plan = ScoringPlan(texts, gen_ids, tok, protocol, context_length(model), batch_size)
    results = {b: score_chunk_batch(model, chunks, plan.eos_id, protocol, device) for b, chunks in plan.batch_payloads()}
    return aggregate(plan.per_text(results), protocol)

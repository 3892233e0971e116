"""Top-p (nucleus) filtering and sampling over large vocabularies (Qwen: V = 151,936).

Definition (one definition everywhere, so the fast path and the reference agree exactly):
- probabilities ``q = exp(l - logsumexp(l))`` in fp32 over the whole row (``l`` = tempered logits);
- sort ``q`` descending: ``s_0 >= s_1 >= ...``; exclusive cumulative mass ``c_j = sum_{i<j} s_i``
  (fp64, so the nucleus edge is not decided by fp32 rounding);
- ``n = #{j : c_j < p}`` (>= 1: the top token is always kept), threshold ``t = s_{n-1}``;
- kept set = ``{v : q_v >= t}`` (ties at the threshold are all kept, so the set does not depend
  on how a sort orders equal values).

Fast path: a full sort of every 152k row is what dominates a naive sampler. ``torch.topk`` with
``k + 1`` values finds the nucleus of a row exactly whenever the top-k mass reaches ``p`` *and*
the (k+1)-th value is strictly below the threshold (no tie crossing the cut). Rows failing that
test (flat distributions: high temperature, untrained models) fall back to a radix select of the
threshold (two histogram passes, no sort; ``_threshold_radix``); the kept set is identical either
way (``tests/test_sampling.py`` checks equality with the full-sort reference).

Sampling uses the inverse CDF over the kept set *in vocabulary order* (on both paths, so a row's
token for a given uniform does not depend on which path found its nucleus) with one uniform per
row, so a sampler needs only ``[rows]``
random numbers (not ``[rows, V]`` Gumbel noise) and callers can draw them from per-sample
generators (reproducible whatever the batch size).
"""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_K = 1024
DEFAULT_CHUNK_ROWS = 256  # rows per pass: [256, 152k] fp64 is 311 MB


def _probs(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))


def _nucleus_sorted(sorted_probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_probs [R, m] descending -> (kept count n [R], threshold [R]) by the module's rule."""
    c = torch.cumsum(sorted_probs.double(), dim=-1)
    excl = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=-1)
    n = (excl < top_p).sum(dim=-1).clamp(min=1)
    thr = sorted_probs.gather(1, (n - 1).unsqueeze(1)).squeeze(1)
    return n, thr


def _nucleus_rows(logits: torch.Tensor, top_p: float, k: int):
    """Yield the nucleus of each row as (row index tensor, sorted probs, ids, keep mask), split
    into a fast top-k group and a full-sort fallback group."""
    probs = _probs(logits)
    R, V = probs.shape
    kk = min(k + 1, V)
    if kk >= V:
        # A vocabulary no larger than k (e.g. a compact head): sorting whole rows is cheap, while the
        # radix fallback's 2^16-bucket fp64 histograms per row would cost far more than V.
        vals, ids = torch.sort(probs, dim=-1, descending=True)
        _, thr = _nucleus_sorted(vals, top_p)
        gid, perm = torch.sort(ids, dim=-1)
        v = vals.gather(1, perm)
        yield torch.arange(R, device=probs.device), v, gid, v >= thr.unsqueeze(1)
        return
    if kk < V:
        # k * max prob bounds the top-k mass: rows that cannot reach p skip the top-k pass.
        cand = (probs.max(dim=-1).values.double() * k >= top_p).nonzero().squeeze(1)
        ok = torch.zeros(R, dtype=torch.bool, device=probs.device)
        if cand.numel():
            vals, ids = torch.topk(probs[cand], kk, dim=-1, sorted=True)
            _, thr = _nucleus_sorted(vals[:, :-1], top_p)
            mass_k = vals[:, :-1].double().sum(-1)
            # Exact only if the nucleus fits in the top k and no value outside the top k ties the threshold.
            good = (mass_k >= top_p) & (vals[:, -1] < thr)
            ok[cand[good]] = True
            if good.any():
                # back to vocabulary order (the draw's order on every path; k values, cheap)
                gid, perm = torch.sort(ids[good, :-1], dim=-1)
                v = vals[good, :-1].gather(1, perm)
                yield cand[good], v, gid, v >= thr[good].unsqueeze(1)
        slow = (~ok).nonzero().squeeze(1)
    else:
        slow = torch.arange(R, device=probs.device)
    if slow.numel():
        # No sort: the threshold by radix select; rows stay in vocabulary order (any fixed order
        # gives the same law for the inverse-CDF draw).
        v = probs[slow]
        thr = _threshold_radix(v, top_p)
        ids = torch.arange(V, device=v.device).expand(v.shape[0], V)
        yield slow, v, ids, v >= thr.unsqueeze(1)


# Bits 30..0 of a non-negative fp32 value, in two digits: non-negative floats order like their
# int32 bit patterns, so selecting digit by digit from the top is selecting by value.
_DIGITS = ((16, 15), (0, 16))


def _threshold_radix(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus threshold of each row without sorting it.

    With ``M(x)`` = mass of the values ``> x``, the module's threshold ``t = s_{n-1}`` is the
    smallest value of the row with ``M(t) < p`` (for ``j < n``, ``M(s_j) = c_j < p``; every smaller
    value has ``M >= c_n >= p``). ``M`` only decreases as ``x`` grows, so ``t`` is found digit by
    digit: per digit, a histogram (fp64 mass) of the values still in range, then the lowest
    non-empty bucket whose higher buckets plus the mass above the range stay below ``p``. Two
    O(V) histogram passes per row instead of an O(V log V) sort. Zero probabilities (underflow)
    count as empty: a threshold of 0 means keeping the whole row."""
    R, V = probs.shape
    dev = probs.device
    bits = probs.contiguous().view(torch.int32)
    q64 = probs.double()
    prefix = torch.zeros(R, 1, dtype=torch.int32, device=dev)
    above = torch.zeros(R, dtype=torch.float64, device=dev)
    rows = torch.arange(R, device=dev)
    none_ok = torch.zeros(R, dtype=torch.bool, device=dev)
    for shift, width in _DIGITS:
        nb = 1 << width
        digit = ((bits >> shift) & (nb - 1)).masked_fill_((bits >> (shift + width)) != prefix, nb)  # nb: out of range
        digit = digit.long()  # scatter wants int64 indices; the int32 arithmetic above is cheaper
        mass = torch.zeros(R, nb + 1, dtype=torch.float64, device=dev).scatter_add_(1, digit, q64)[:, :nb]
        higher = mass.flip(1).cumsum(1).flip(1) - mass  # mass above bucket j inside the range
        ok = (above.unsqueeze(1) + higher < top_p) & (mass > 0)
        # the lowest ok bucket (ok buckets are an upper range of the non-empty ones)
        j = torch.where(ok, torch.arange(nb, device=dev), nb).min(dim=1).values
        none_ok |= j == nb
        j = j.clamp(max=nb - 1)
        above = above + higher[rows, j]
        prefix = (prefix << width) | j.to(torch.int32).unsqueeze(1)
    thr = prefix.squeeze(1).view(torch.float32)
    return thr.masked_fill(none_ok, 0.0)


def top_p_mask(logits: torch.Tensor, top_p: float, k: int = DEFAULT_K) -> torch.Tensor:
    """Bool [R, V]: the kept set of each row (fast path with exact fallback)."""
    logits = logits.reshape(-1, logits.shape[-1])
    out = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    if top_p >= 1.0:
        return out.fill_(True)
    for rows, _, ids, keep in _nucleus_rows(logits, top_p, k):
        sub = torch.zeros((rows.numel(), logits.shape[1]), dtype=torch.bool, device=logits.device)
        sub.scatter_(1, ids, keep)
        out[rows] = sub
    return out


def top_p_mask_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same kept set computed by a full sort of every row (the definition, for tests/bench)."""
    logits = logits.reshape(-1, logits.shape[-1])
    if top_p >= 1.0:
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    probs = _probs(logits)
    s, _ = torch.sort(probs, dim=-1, descending=True)
    _, thr = _nucleus_sorted(s, top_p)
    return probs >= thr.unsqueeze(1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index j with cum_{j-1} <= u*total < cum_j (weights [R, m] >= 0, u [R] in [0, 1))."""
    cum = torch.cumsum(weights.double(), dim=-1)
    target = (u.double() * cum[:, -1]).unsqueeze(1)
    j = torch.searchsorted(cum, target, right=True).squeeze(1)
    # the last positive entry = the first index where cum reaches the total (guards u*total == total)
    last = torch.searchsorted(cum, cum[:, -1:].contiguous(), right=False).squeeze(1)
    return torch.minimum(j, last)


def sample_top_p(logits: torch.Tensor, u: torch.Tensor, top_p: float, k: int = DEFAULT_K,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Draw one token per row of ``logits`` [R, V] (already tempered) from its top-p nucleus,
    renormalised, by inverse CDF with the given uniforms ``u`` [R]. Rows are processed in chunks
    so the fp32 probabilities of a large batch are never all materialised at once."""
    logits = logits.reshape(-1, logits.shape[-1])
    u = u.reshape(-1).to(logits.device)
    if u.numel() != logits.shape[0]:
        raise ValueError(f"sample_top_p: {u.numel()} uniforms for {logits.shape[0]} rows")
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        lg, uu = logits[start:start + chunk_rows], u[start:start + chunk_rows]
        res = out[start:start + chunk_rows]
        if top_p >= 1.0:
            # No filtering: vocabulary order is as good as sorted order for an inverse CDF.
            res.copy_(_inverse_cdf(_probs(lg), uu))
            continue
        for rows, vals, ids, keep in _nucleus_rows(lg, top_p, k):
            j = _inverse_cdf(vals * keep, uu[rows])
            res[rows] = ids.gather(1, j.unsqueeze(1)).squeeze(1)
    return out


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log q(token) under the (tempered, unfiltered) softmax of ``logits`` [..., V]."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def apply_temperature(logits: torch.Tensor, temperature, banned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits [B, T, V] / temperature (a float or a per-position tensor [T] / [B, T]); ``banned``
    token ids (e.g. the mask token, ids beyond the tokenizer's vocabulary) get -inf."""
    logits = logits.float()
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(logits.device, torch.float32)
        return logits / t.unsqueeze(-1)  # [T] or [B, T] -> broadcast over the vocabulary
    return logits / float(temperature)

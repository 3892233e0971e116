"""The factorized baseline: Prop. 1's barrier as a series of the evaluation.

Every position t of a sample is drawn independently from the training shards' marginal p_t(token)
at that position (EOS and pad positions included, so lengths come out of the marginals too), and
the sample is cut at its first EOS like a generator's. A generator whose outputs are conditionally
independent given nothing -- the best any model without a shared latent can do position by
position -- generates exactly this; one-step samples must beat it to show that the coupling carries
the dependencies between positions.
"""
from __future__ import annotations

import numpy as np

from ..data.shards import iter_shards
from ..sampling.generate import truncate_at_eos
from .samples_file import SampleFile


def position_marginals(data_dir: str, vocab_size: int, seq_len: int) -> np.ndarray:
    """Counts [T, V] of each token id at each position over every training sample."""
    counts = np.zeros((seq_len, vocab_size), dtype=np.int64)
    for samples in iter_shards(data_dir, "train", fields=["tokens"]):
        tok = np.stack([s["tokens"] for s in samples])
        for t in range(seq_len):
            counts[t] += np.bincount(tok[:, t].astype(np.int64), minlength=vocab_size)
    return counts


def factorized_samples(data_dir: str, data_tok, n: int, seed: int, seq_len: int) -> SampleFile:
    """``n`` factorized-baseline samples as a SampleFile (text, ids before the first EOS, eos flag)."""
    vocab = max(len(data_tok), int(data_tok.eos_token_id) + 1)
    counts = position_marginals(data_dir, vocab, seq_len)
    if not counts.sum():
        raise ValueError(f"{data_dir}: no training samples to take per-position marginals from")
    rng = np.random.default_rng(seed)
    cols = []
    for t in range(seq_len):
        ids = np.flatnonzero(counts[t])
        p = counts[t, ids] / counts[t, ids].sum()
        cols.append(ids[rng.choice(len(ids), size=n, p=p)])
    rows = np.stack(cols, 1)
    sf = SampleFile("factorized")
    eos = int(data_tok.eos_token_id)
    for i, row in enumerate(rows.tolist()):
        ids, had_eos = truncate_at_eos(row, eos)
        sf.records.append({"line": None, "text": data_tok.decode(ids), "ids": ids, "index": i, "settings": None,
                           "eos": had_eos})
    return sf

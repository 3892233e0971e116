"""DNA sample metrics: k-mer spectra, GC content and the Fréchet distance in a classifier's features.

The paper scores DNA by FBD only (§4, Appendix G.2: the Fréchet distance in the embedding of the
frozen DeepFlyBrain classifier). That classifier and the Fly Brain data are not available offline;
``dna_report`` computes the same kind of distance in the feature space of our own ``seq1d``
classifier trained to tell genomes apart (``evaluation.feature_net``; windows from
``data.genomes``), plus two classifier-free statistics that need no training:

- k-mer spectrum distance, k = 1..6: for a set of sequences, count every overlapping k-mer of every
  sequence (4^k counts), normalise the counts to a probability vector; the distance between two
  sets is the Jensen-Shannon divergence of their vectors in bits,
  JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, in [0, 1] (0 iff p = q).
  k = 1 is base composition; larger k sees codon structure and motifs that a per-position
  (factorized) model cannot reproduce. Finite sets give a small positive JS even between two
  samples of one distribution (more so for large k: 4096 bins at k = 6), so compare a model's
  value with the held-out-data value measured at the same set sizes.
- GC content: the fraction of G or C bases per sequence; reported as the mean / std over each set
  and the 1-D Wasserstein-1 distance between the two sets' per-sequence GC fractions
  (``scipy.stats.wasserstein_distance``, in GC-fraction units).
- FBD (``net`` given): ``evaluation.frechet.frechet_distance`` on the classifier's penultimate
  features (torchmetrics' Fréchet distance, float64).

``factorized_dna`` is the per-position-marginals baseline for the tables (Prop. 1's barrier): each
position drawn independently from the reference windows' nucleotide frequencies at that position.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..data.genomes import decode_dna, dna_ids, encode_dna
from .frechet import frechet_distance

KS = (1, 2, 3, 4, 5, 6)


def _tokens(seqs: Sequence[str], what: str) -> list[np.ndarray]:
    """Each sequence as uint8 ids (lengths may differ); a clear error naming the bad sequence."""
    if not len(seqs):
        raise ValueError(f"no {what} sequences")
    out = []
    for i, s in enumerate(seqs):
        try:
            out.append(dna_ids(s))
        except ValueError as e:
            raise ValueError(f"{what} sequence {i} {e}") from None
    return out


def kmer_counts(seqs: Sequence[str], k: int, what: str = "DNA") -> np.ndarray:
    """Counts [4^k] of every overlapping k-mer (base-4 index, first base most significant);
    ``seqs``: ACGT strings or their id arrays."""
    counts = np.zeros(4 ** k, dtype=np.int64)
    for ids in (seqs if len(seqs) and isinstance(seqs[0], np.ndarray) else _tokens(seqs, what)):
        if len(ids) < k:
            continue
        idx = np.zeros(len(ids) - k + 1, dtype=np.int64)
        for j in range(k):
            idx = idx * 4 + ids[j:len(ids) - k + 1 + j]
        counts += np.bincount(idx, minlength=4 ** k)
    return counts


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two count (or probability) vectors."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("a k-mer spectrum is empty (sequences shorter than k?)")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def kmer_distances(samples: Sequence[str], reference: Sequence[str], ks: Sequence[int] = KS) -> dict[int, float]:
    """{k: JS divergence (bits) between the k-mer spectra of the two sets}."""
    s, r = _tokens(samples, "sample"), _tokens(reference, "reference")
    return {k: js_divergence(kmer_counts(s, k), kmer_counts(r, k)) for k in ks}


def gc_fractions(seqs: Sequence[str], what: str = "DNA") -> np.ndarray:
    """Per-sequence fraction of G/C bases (C = 1, G = 2)."""
    return np.array([float(np.isin(ids, (1, 2)).mean()) if len(ids) else np.nan for ids in _tokens(seqs, what)])


def gc_stats(samples: Sequence[str], reference: Sequence[str]) -> dict:
    from scipy.stats import wasserstein_distance

    s, r = gc_fractions(samples, "sample"), gc_fractions(reference, "reference")
    return dict(sample_mean=float(np.nanmean(s)), sample_std=float(np.nanstd(s)),
                reference_mean=float(np.nanmean(r)), reference_std=float(np.nanstd(r)),
                wasserstein=float(wasserstein_distance(s[~np.isnan(s)], r[~np.isnan(r)])))


def dna_report(samples: Sequence[str], reference: Sequence[str], net=None, ks: Sequence[int] = KS,
               batch_size: int = 256) -> dict:
    """{n_samples, n_reference, kmer_js {k: JS bits}, kmer_js_mean, gc {...}, fbd (None without ``net``)}.

    ``reference``: real windows -- the training windows, as the paper scores FID against the training
    set (G.1), or held-out ones; report the held-out-vs-reference value beside a model's, since
    finite sets never score 0. The FBD needs sequences of one length (the classifier's inputs are
    batched)."""
    kmer = kmer_distances(samples, reference, ks)
    fbd: Optional[float] = None
    if net is not None:
        fbd = frechet_distance(net, encode_dna(reference), encode_dna(samples), batch_size=batch_size)
    return dict(n_samples=len(samples), n_reference=len(reference), kmer_js={str(k): v for k, v in kmer.items()},
                kmer_js_mean=float(np.mean(list(kmer.values()))), gc=gc_stats(samples, reference), fbd=fbd)


def factorized_dna(windows: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` sequences whose positions are drawn independently from the per-position nucleotide
    frequencies of ``windows`` (all of one length)."""
    ids = encode_dna(windows)
    if not len(ids):
        raise ValueError("factorized_dna needs at least one window to take marginals from")
    length = ids.shape[1]
    counts = np.stack([np.bincount(ids[:, t], minlength=4) for t in range(length)])  # [L, 4]
    cdf = np.cumsum(counts / counts.sum(1, keepdims=True), axis=1)
    u = np.random.default_rng(seed).random((n, length))
    out = (u[:, :, None] > cdf[None, :, :]).sum(2)  # inverse-CDF draw per position
    return decode_dna(np.minimum(out, 3))


def _row_kmer_counts(rows: np.ndarray, k: int) -> np.ndarray:
    """``kmer_counts`` of equal-length id rows [N, L], all rows at once."""
    n = rows.shape[1] - k + 1
    idx = np.zeros((len(rows), max(n, 0)), dtype=np.int64)
    for j in range(k):
        idx = idx * 4 + rows[:, j:j + n]
    return np.bincount(idx.ravel(), minlength=4 ** k)


def token_metrics(samples: np.ndarray, reference: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """The classifier-free metrics of ``dna_report`` as flat columns, on token rows (ids 0..3, one
    length): ``kmer_js_<k>`` and ``kmer_js_mean`` (bits), the samples' ``gc_mean`` / ``gc_std`` and
    ``gc_w1`` (Wasserstein-1 between the two sets' per-sequence GC fractions)."""
    from scipy.stats import wasserstein_distance

    s, r = np.asarray(samples, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    if s.ndim != 2 or r.ndim != 2 or not len(s) or not len(r):
        raise ValueError(f"token_metrics needs token rows [N, L] of samples and reference; got {s.shape}, {r.shape}")
    out = {f"kmer_js_{k}": js_divergence(_row_kmer_counts(s, k), _row_kmer_counts(r, k)) for k in ks}
    out["kmer_js_mean"] = float(np.mean([out[f"kmer_js_{k}"] for k in ks]))
    gc_s, gc_r = np.isin(s, (1, 2)).mean(1), np.isin(r, (1, 2)).mean(1)
    out.update(gc_mean=float(gc_s.mean()), gc_std=float(gc_s.std()), gc_w1=float(wasserstein_distance(gc_s, gc_r)))
    return out

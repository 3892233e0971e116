"""A synthetic agreement grammar with long-range constraints and an exact validity checker.

The quality benchmark (``tools/bench_quality.py``) trains the pipeline on sentences of this grammar
because validity is decidable: a sample is valid or it is not, and each constraint can be checked
on its own. Every word is one token of the GPT-2 and SmolLM2 tokenizers (with its leading space;
the capitalised first word without), so positions are words.

    SENT  = TENSE SUBJ [REL] VERB(n) OBJ ADV(TENSE)
    TENSE = Then | Soon                     ADV must match: Then..ago, Soon..later (first..last word)
    SUBJ  = DET(n) ADJ{0,2} NOUN(n)         (determiner-noun number agreement)
    REL   = OPEN that DET(m) ADJ{0,1} NOUN(m) VERB(m) CLOSE      OPEN..CLOSE must match: ( ) or [ ]
    VERB(n): the main verb agrees with the subject noun across the relative clause (7-9 words apart)
    OBJ   = DET(k) ADJ{0,1} NOUN(k)

Sentences have 7-17 words. Long-range constraints (>= 5 positions apart): TENSE..ADV (always),
subject..main verb when a clause is present, OPEN..CLOSE (6-7 apart). Drawing each position
independently from the data's per-position marginals (the factorized baseline of the paper's
Prop. 1) gives ~0 % valid sentences; 20,000 draws hold ~19,000 distinct sentences.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Optional, Sequence

import numpy as np

TENSE = {"Then": "ago", "Soon": "later"}
DET = {"sg": ["a", "this"], "pl": ["some", "these"]}
NOUN = {"sg": ["cat", "dog", "bird", "pig", "man"], "pl": ["cats", "dogs", "birds", "pigs", "men"]}
VERB = {"sg": ["sees", "meets", "likes"], "pl": ["see", "meet", "like"]}
ADJ = ["big", "small", "red", "old"]
BRACKETS = {"(": ")", "[": "]"}
WORDS = (list(TENSE) + list(TENSE.values()) + sum(DET.values(), []) + sum(NOUN.values(), [])
         + sum(VERB.values(), []) + ADJ + ["that"] + list(BRACKETS) + list(BRACKETS.values()))
MAX_WORDS = 17
NUM_OF = {w: n for n in ("sg", "pl") for w in DET[n] + NOUN[n] + VERB[n]}
CONSTRAINTS = ("tense", "agree", "bracket")


def _noun_phrase(rng: random.Random, max_adj: int) -> tuple[list, str]:
    n = rng.choice(("sg", "pl"))
    adjs = [rng.choice(ADJ) for _ in range(rng.randint(0, max_adj))]
    return [rng.choice(DET[n])] + adjs + [rng.choice(NOUN[n])], n


def sample_sentence(rng: random.Random, p_clause: float = 0.5) -> list[str]:
    tense = rng.choice(list(TENSE))
    subj, n = _noun_phrase(rng, 2)
    clause = []
    if rng.random() < p_clause:
        op = rng.choice(list(BRACKETS))
        inner, m = _noun_phrase(rng, 1)
        clause = [op, "that"] + inner + [rng.choice(VERB[m]), BRACKETS[op]]
    obj, _ = _noun_phrase(rng, 1)
    return [tense] + subj + clause + [rng.choice(VERB[n])] + obj + [TENSE[tense]]


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences as text, one word per token."""
    rng = random.Random(seed)
    return [" ".join(sample_sentence(rng)) for _ in range(n)]


# ----------------------------------------------------------------------------- exact checker


def _parse_np(w: list, i: int, max_adj: int) -> Optional[tuple[int, str]]:
    if i >= len(w) or w[i] not in NUM_OF or w[i] not in DET[NUM_OF[w[i]]]:
        return None
    n, i, k = NUM_OF[w[i]], i + 1, 0
    while i < len(w) and w[i] in ADJ:
        i, k = i + 1, k + 1
    if k > max_adj or i >= len(w) or w[i] not in NOUN[n]:
        return None
    return i + 1, n


def check_words(w: Sequence[str]) -> dict:
    """{"valid": bool, "tense"/"agree"/"bracket": bool or None (None: not reached by the parse)}."""
    w = list(w)
    res = {"valid": False, "tense": None, "agree": None, "bracket": None}
    if len(w) < 2:
        return res
    if w[0] in TENSE and w[-1] in TENSE.values():
        res["tense"] = TENSE[w[0]] == w[-1]
    ok = bool(res["tense"])
    p = _parse_np(w, 1, 2)
    if p is None:
        return res
    i, n = p
    if i < len(w) and w[i] in BRACKETS:
        op = w[i]
        q = _parse_np(w, i + 2, 1) if i + 1 < len(w) and w[i + 1] == "that" else None
        if q is None:
            return res
        j, m = q
        if j + 1 >= len(w) or w[j] not in VERB[m] or w[j + 1] not in BRACKETS.values():
            return res
        res["bracket"] = w[j + 1] == BRACKETS[op]
        ok = ok and res["bracket"]
        i = j + 2
    if i >= len(w) or w[i] not in NUM_OF or w[i] not in VERB[NUM_OF[w[i]]]:
        return res
    res["agree"] = NUM_OF[w[i]] == n
    ok = ok and res["agree"]
    q = _parse_np(w, i + 1, 1)
    res["valid"] = bool(ok and q is not None and q[0] == len(w) - 1)
    return res


def check_text(text: str, eos: bool = True) -> dict:
    """A decoded sample (text before its EOS; ``eos``: whether it had one) -> ``check_words``."""
    return check_words(text.split()) if eos else check_words([])


def score(samples: Sequence[tuple[str, bool]], train: Optional[set] = None) -> dict:
    """samples: (text, had_eos) pairs -> valid, distinct, valid-and-distinct fractions, novelty of the
    valid ones (vs ``train``), per-constraint satisfaction where reached, no-EOS fraction, and the
    unigram entropy of the words (nats)."""
    n = max(len(samples), 1)
    rs = [check_text(t, e) for t, e in samples]
    keys = [(" ".join(t.split()), e) for t, e in samples]
    valid = [k[0] for k, r in zip(keys, rs) if r["valid"]]
    out = {"n": len(samples), "valid": len(valid) / n, "distinct": len(set(keys)) / n,
           "valid_distinct": len(set(valid)) / n, "no_eos": sum(not e for _, e in samples) / n}
    if train is not None and valid:
        out["novel_of_valid"] = sum(v not in train for v in valid) / len(valid)
    for c in CONSTRAINTS:
        vals = [r[c] for r in rs if r[c] is not None]
        out[c] = sum(vals) / len(vals) if vals else None
    out["unigram_entropy"] = unigram_entropy(t for t, _ in samples)
    return out


def unigram_entropy(texts) -> float:
    counts = Counter(w for t in texts for w in t.split())
    p = np.array(list(counts.values()), dtype=np.float64)
    if not p.size:
        return 0.0
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def factorized_baseline(sentences: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, bool]]:
    """Each word position drawn independently from the data's per-position marginals, the end of
    the sentence included (an END symbol at every position past the last word): Prop. 1's barrier."""
    END = None
    rows = [s.split() + [END] * (MAX_WORDS + 1 - len(s.split())) for s in sentences]
    cols = list(zip(*rows))
    rng = np.random.default_rng(seed)
    out = []
    picks = []
    for col in cols:
        vocab = sorted(set(col), key=lambda w: "" if w is None else w)
        counts = Counter(col)
        p = np.array([counts[w] for w in vocab], dtype=np.float64)
        picks.append([vocab[i] for i in rng.choice(len(vocab), size=n, p=p / p.sum())])
    for j in range(n):
        words = []
        eos = False
        for col in picks:
            if col[j] is END:
                eos = True
                break
            words.append(col[j])
        out.append((" ".join(words), eos))
    return out

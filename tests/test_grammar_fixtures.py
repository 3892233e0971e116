"""The quality benchmark's grammar: the checker accepts every generated sentence, rejects each
broken constraint, and the factorized baseline (Prop. 1's barrier) is almost never valid."""
from __future__ import annotations

import random

import grammar_fixtures as G
from coupling_dist.components import assets


def test_data_valid_and_each_broken_constraint_rejected():
    sentences = G.corpus(2000, seed=3)
    s = G.score([(t, True) for t in sentences])
    assert s["valid"] == 1.0 and s["no_eos"] == 0.0 and s["distinct"] > 0.95
    rng = random.Random(0)
    flips = {"ago": "later", "later": "ago", "(": "[", "[": "("}
    broke = {"tense": 0, "agree": 0, "bracket": 0}
    for t in sentences[:300]:
        w = t.split()
        tense = w[:-1] + [flips[w[-1]]]
        assert not G.check_words(tense)["valid"] and G.check_words(tense)["tense"] is False
        broke["tense"] += 1
        if w[2] in G.BRACKETS or w[3] in G.BRACKETS or w[4] in G.BRACKETS:
            i = next(i for i in range(2, 5) if w[i] in G.BRACKETS)
            br = w[:i] + [flips[w[i]]] + w[i + 1:]
            assert G.check_words(br)["bracket"] is False and not G.check_words(br)["valid"]
            broke["bracket"] += 1
            # the main verb sits right after the closing bracket: swap its number
            j = br.index(")" if w[i] == "(" else "]") + 1
            verbs = G.VERB["pl" if G.NUM_OF[w[j]] == "sg" else "sg"]
            ag = w[:j] + [rng.choice(verbs)] + w[j + 1:]
            assert G.check_words(ag)["agree"] is False and not G.check_words(ag)["valid"]
            broke["agree"] += 1
        assert not G.check_text(t, eos=False)["valid"]  # no EOS: the sentence never ended
        assert not G.check_words(w[:-1])["valid"]  # cut short
    assert min(broke.values()) > 50


def test_factorized_baseline_is_near_zero_and_words_are_single_tokens():
    sentences = G.corpus(4000, seed=1)
    fb = G.score(G.factorized_baseline(sentences, 2000, seed=0))
    assert fb["valid"] < 0.01 and fb["distinct"] > 0.9
    tok = assets.load_tokenizer("asset:gpt2-tokenizer")
    for w in G.WORDS:
        ids = tok(w if w in G.TENSE else " " + w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, w

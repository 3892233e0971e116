"""The paper protocol end to end on fixed records vs a transcription of the released recipe
(``eval.py``: decode_tokens, compute_gen_ppl, compute_unigram_entropy), length statistics, and the
reported reference points' units."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coupling_dist.components import assets
from coupling_dist.evaluation.protocol import length_stats, protocol_inputs, total_variation
from coupling_dist.evaluation.report import REPORTED_LM1B, in_unit
from coupling_dist.evaluation.scorer import score_local

T = 24


@pytest.fixture(scope="module")
def scorer():
    ref = assets.resolve("tiny:gpt2")
    return assets.load_causal_lm(ref), assets.load_tokenizer(ref)


@pytest.fixture(scope="module")
def qwen():
    return assets.load_tokenizer("asset:qwen2.5-tokenizer")


def _records(qwen):
    eos = qwen.eos_token_id  # = pad id (151643)
    texts = ["The court heard the case on Monday.", "Rain fell across the city", "A b c"]
    recs = []
    for i, t in enumerate(texts):
        ids = qwen(t, add_special_tokens=False)["input_ids"]
        tail = qwen(" and then more words", add_special_tokens=False)["input_ids"] if i == 0 else []
        # sample 0 keeps generating after its EOS; sample 2 never emits one
        full = (ids + ([eos] + tail if i != 2 else []) + [eos] * T)[:T] if i != 2 else (ids * T)[:T]
        cut = full.index(eos) if eos in full else len(full)
        recs.append({"text": qwen.decode(full[:cut]), "ids": full[:cut], "eos": eos in full, "all_ids": full})
    return recs


def _released_recipe(model, gpt2_tok, qwen, recs):
    """eval.py, transcribed: decode_tokens (pad ids dropped, skip_special_tokens), GPT-2 batch
    tokenization with padding and truncation at 256, shifted NLL under the attention mask;
    entropy = mean over samples of the unigram entropy (log2) of all generated ids."""
    texts = [qwen.decode([i for i in r["all_ids"] if i != 151643], skip_special_tokens=True) for r in recs]
    gpt2_tok.pad_token = gpt2_tok.eos_token
    enc = gpt2_tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    with torch.no_grad():
        logits = model(enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), enc["input_ids"][:, 1:].reshape(-1),
                          reduction="none").view(len(texts), -1)
    m = enc["attention_mask"][:, 1:]
    ppl = math.exp(float((nll * m).sum()) / float(m.sum()))
    ents = []
    for r in recs:
        c = torch.bincount(torch.tensor(r["all_ids"]), minlength=151936).float()
        p = c / c.sum()
        ents.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
    return ppl, sum(ents) / len(ents), texts


def test_paper_protocol_equals_the_released_recipe(scorer, qwen):
    model, gpt2_tok = scorer
    recs = _records(qwen)
    texts, ids = protocol_inputs(recs, "paper", qwen, T)
    ppl, ent, want_texts = _released_recipe(model, gpt2_tok, qwen, recs)
    assert texts == want_texts and "then more words" in texts[0]  # text after the EOS is kept, as released
    got = score_local(model, gpt2_tok, texts, ids, protocol="paper", batch_size=2)
    assert got["gen_ppl"] == pytest.approx(ppl, rel=1e-5)
    assert got["entropy"] == pytest.approx(ent, rel=1e-6) and got["entropy_unit"] == "bits"  # fp32 there
    mdlm_texts, mdlm_ids = protocol_inputs(recs, "mdlm", qwen, T)
    assert mdlm_texts[0] == recs[0]["text"] and "then" not in mdlm_texts[0] and mdlm_ids[0] == recs[0]["ids"]


def test_records_without_all_ids_are_completed_like_the_data(qwen):
    recs = _records(qwen)
    bare = [{k: v for k, v in r.items() if k != "all_ids"} for r in recs[1:2]]
    _, ids = protocol_inputs(bare, "paper", qwen, T)
    assert ids[0] == recs[1]["all_ids"]  # ids + EOS + pads to T


def test_length_stats():
    recs = [{"ids": [1] * n, "eos": n < 5} for n in (2, 3, 3, 5)]
    s = length_stats(recs, [2, 3, 3, 5])
    assert s["length_tv"] == 0.0 and s["no_eos_fraction"] == 0.25
    assert total_variation([1, 1], [2, 2]) == 1.0
    assert length_stats(recs, None)["length_tv"] is None


def test_reported_points_carry_their_own_units():
    units = {label: u for label, _, _, u, _ in REPORTED_LM1B}
    assert units["LM1B test data (paper)"] == "bits" and units["FMLM (reported)"] == "nats"
    assert in_unit(1.0, "bits", "nats") == pytest.approx(math.log(2))
    assert in_unit(4.16, "nats", "nats") == 4.16  # a nats figure is not rescaled as if it were bits

"""Evaluation: Gen-PPL vs a direct single-process computation (1 and 2 Ray actors), protocol
details, metrics, bad sample files with line numbers, the evaluate entry end to end, and (slow) a
real small LM telling real text from shuffled words."""
from __future__ import annotations

import json
import math
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import demo_cfg  # noqa: E402

from coupling_dist.components import assets, faults  # noqa: E402
from coupling_dist.evaluation.samples_file import read_samples  # noqa: E402
from coupling_dist.evaluation.scorer import (ScoringPlan, distinct_n, score_chunk_batch,  # noqa: E402
                                             score_local, text_chunks, unigram_entropy)


def _lee(n: int, start: int = 0) -> list[str]:
    with open(assets.resolve("asset:lee-corpus"), encoding="utf-8") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    return lines[start:start + n]


@pytest.fixture(scope="module")
def gpt2():
    ref = assets.resolve("tiny:gpt2")
    return assets.load_causal_lm(ref), assets.load_tokenizer(ref), ref


def _direct_gen_ppl(model, tok, texts, protocol):
    """Gen-PPL written out per text, no batching, no padding."""
    eos = tok.eos_token_id
    nll, cnt = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        ids = ids[:256] if protocol == "paper" else ids + [eos]
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits.float()[0, :-1], -1)
        for pos in range(1, len(ids)):
            nll -= float(logp[pos - 1, ids[pos]])
            cnt += 1
    return math.exp(nll / cnt), cnt


@pytest.mark.parametrize("protocol", ["mdlm", "paper"])
def test_gen_ppl_local_equals_direct(gpt2, protocol):
    model, tok, _ = gpt2
    texts = _lee(12) + [" ".join(_lee(30, 100))]  # one text beyond 256 scorer tokens (paper truncation)
    direct, cnt = _direct_gen_ppl(model, tok, texts, protocol)
    got = score_local(model, tok, texts, protocol=protocol, batch_size=4)
    assert got["scored_tokens"] == cnt
    assert got["gen_ppl"] == pytest.approx(direct, rel=1e-5)
    assert got["entropy_unit"] == ("bits" if protocol == "paper" else "nats")


def test_gen_ppl_ray_pool_1_and_2_actors(gpt2, ray_head):
    from coupling_dist.evaluation.pool import ScorerPool

    model, tok, ref = gpt2
    texts = _lee(20, 40)
    direct, cnt = _direct_gen_ppl(model, tok, texts, "mdlm")
    results = []
    for n in (1, 2):
        with ScorerPool(ref, num_actors=n, address=ray_head["address"]) as pool:
            assert pool.num_actors == n
            results.append(pool.score(texts, None, tok, "mdlm", batch_size=3))
            pids = {i["pid"] for i in pool.info}
            assert len(pids) == n  # one loaded model per actor process
    one, two = results
    assert one["scored_tokens"] == two["scored_tokens"] == cnt
    assert one["nll_sum"] == two["nll_sum"] and one["gen_ppl"] == two["gen_ppl"]  # identical, not just close
    assert one["gen_ppl"] == pytest.approx(direct, rel=1e-5)


def test_killed_scorer_actor_is_replaced_and_result_unchanged(gpt2, ray_head, tmp_path, monkeypatch):
    """A scorer actor process dies in the middle of a batch: Ray restarts it, the batch is retried,
    and the metrics are identical to an undisturbed run."""
    from coupling_dist.evaluation.pool import ScorerPool

    model, tok, ref = gpt2
    texts = _lee(12, 60)
    with ScorerPool(ref, num_actors=2, address=ray_head["address"]) as pool:
        clean = pool.score(texts, None, tok, "mdlm", batch_size=2)
    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.ENV, faults.spec("evaluate.batch", batch=2, once=marker))
    with ScorerPool(ref, num_actors=2, address=ray_head["address"]) as pool:
        hurt = pool.score(texts, None, tok, "mdlm", batch_size=2)
    assert marker.exists()  # the crash really happened
    assert hurt["nll_sum"] == clean["nll_sum"] and hurt["scored_tokens"] == clean["scored_tokens"]
    assert hurt["entropy"] == clean["entropy"]


def test_mdlm_first_eos_rule_and_chunks(gpt2):
    model, tok, _ = gpt2
    eos = tok.eos_token_id
    a = [464, 3290, eos, 318, eos]  # scored: 3290, the first EOS, 318; the second EOS is not
    b = [464, 3290, 318, 257]
    (_, ca), (_, cb) = score_chunk_batch(model, [a, b], eos, "mdlm")
    assert (ca, cb) == (3, 3)
    (_, pa), = score_chunk_batch(model, [a], eos, "paper")
    assert pa == 4
    # Chunking: a long text is cut into context-length chunks, each with its first token unscored.
    text = " ".join(_lee(5))
    n = len(tok(text, add_special_tokens=False)["input_ids"]) + 1
    chunks = text_chunks(text, tok, "mdlm", 16)
    assert [len(c) for c in chunks[:-1]] == [16] * (len(chunks) - 1) and sum(map(len, chunks)) == n
    plan = ScoringPlan([text], [None], tok, "mdlm", 16, batch_size=2)
    res = {b: score_chunk_batch(model, c, eos, "mdlm") for b, c in plan.batch_payloads()}
    assert plan.per_text(res)[0]["count"] == n - len(chunks)


def test_entropy_and_distinct():
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([1, 1, 2, 2], base=2) == pytest.approx(1.0)
    assert unigram_entropy([5, 5, 5]) == 0.0
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)


def test_bad_sample_file_lines_reported(tmp_path):
    p = tmp_path / "samples.jsonl"
    lines = [
        json.dumps({"index": 0, "text": "A fine sentence.", "ids": [1, 2, 3]}).encode(),  # 1 ok
        b"",  # 2 empty
        b'{"text": "caf\xe9"}',  # 3 latin-1 byte
        b'{"text": "unterminated',  # 4 invalid JSON
        json.dumps({"index": 4, "ids": [1]}).encode(),  # 5 missing text
        json.dumps({"text": 17}).encode(),  # 6 text not a string
        json.dumps({"text": "x" * 500}).encode(),  # 7 too long
        json.dumps({"text": "ok", "ids": ["a"]}).encode(),  # 8 bad ids
        json.dumps([1, 2]).encode(),  # 9 not an object
        b"   ",  # 10 whitespace only
        json.dumps({"text": "Another one, with ünïcode."}).encode(),  # 11 ok
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    sf = read_samples(str(p), max_chars=100)
    assert [r["line"] for r in sf.records] == [1, 11]
    got = {q["line"]: q["reason"] for q in sf.problems}
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    for line, word in [(2, "empty"), (3, "UTF-8"), (4, "invalid JSON"), (5, "missing field 'text'"),
                       (6, "not a string"), (7, "too long"), (8, "'ids'"), (9, "not a JSON object"), (10, "empty")]:
        assert word in got[line], (line, got[line])
    assert sf.summary()["bad"] == 9


def test_evaluate_entry_end_to_end(tmp_path, ray_head, monkeypatch):
    """Sample file with bad lines + a sweep on a toy export + a reference file -> results.json, CSV, PNG."""
    from toy_generators import OneStepToy, onestep_meta

    import coupling_dist.sampling.generate as sample_mod
    from coupling_dist.evaluate import main

    V, T, d, eos = 151936, 12, 8, 151643
    export = tmp_path / "stage_b" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    from safetensors.torch import save_file  # a complete weights file: evaluate checks it before loading

    save_file({"w": torch.zeros(2)}, str(export / "model.safetensors"))
    toy = OneStepToy(V, T, d, eos_id=eos, sharpness=3.0)
    monkeypatch.setattr(sample_mod, "load_export",
                        lambda path, device="cpu", kind="generator": (toy, onestep_meta(V, T, d, eos,
                                                                                         "asset:qwen2.5-tokenizer")))
    sdir = tmp_path / "sample"
    sdir.mkdir()
    good = [json.dumps({"index": i, "text": t}) for i, t in enumerate(_lee(6))]
    (sdir / "samples.jsonl").write_text("\n".join(good[:3] + ["", "{oops"] + good[3:]) + "\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(_lee(10, 200)) + "\n")
    cfg = demo_cfg(tmp_path, f"ray.address={ray_head['address']}", "evaluate.num_actors=2",
                   "evaluate.temperatures=[0.5,1.0]", "evaluate.num_samples=6", "evaluate.steps=[1,2]",
                   f"evaluate.reference={ref}", "evaluate.batch_size=4")
    out = main(cfg)
    res = json.load(open(out["json"]))
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds == ["file", "sweep", "sweep", "reference"]
    file_row = res["rows"][0]
    assert file_row["num_texts"] == 6 and file_row["bad_lines"] == 2
    assert [b["line"] for b in res["sample_files"][0]["bad_lines"]] == [4, 5]
    assert any("steps=2" in n for n in res["notes"])  # K > 1 needs a masked export: said, not hidden
    sweep = res["rows"][1:3]
    assert [r["temperature"] for r in sweep] == [0.5, 1.0]
    assert sweep[0]["entropy"] < sweep[1]["entropy"]  # a colder sampler repeats itself more
    assert all(r["gen_ppl"] > 1 for r in res["rows"])
    for r in sweep:  # the length distribution against the reference, and samples that never ended
        assert 0.0 <= r["no_eos_fraction"] <= 1.0 and 0.0 < r["length_tv"] <= 1.0
    assert res["rows"][-1]["length_tv"] == 0.0
    assert any("no Stage A export" in n for n in res["notes"])  # the Stage-A-only series: said when absent
    assert len(res["reported_lm1b"]) == 6
    csv_lines = open(out["csv"]).read().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("name,kind,protocol")
    assert open(out["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(tmp_path / "eval" / "samples" / "K1_s0.85_p0.95_t0.5.jsonl")


@pytest.mark.slow
def test_real_lm_scores_real_text_far_below_shuffled():
    """SmolLM2-135M (real weights, gguf) as the scorer: held-out Lee sentences vs the same words shuffled."""
    ref = assets.resolve("asset:smollm2-135m-gguf")
    model, tok = assets.load_causal_lm(ref), assets.load_tokenizer(ref)
    texts = _lee(40, 2400)  # the tail of the corpus (the held-out end)
    rng = random.Random(0)
    shuffled = []
    for t in texts:
        words = t.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    real = score_local(model, tok, texts, protocol="mdlm", batch_size=8)
    shuf = score_local(model, tok, shuffled, protocol="mdlm", batch_size=8)
    assert real["gen_ppl"] < 100, real
    assert shuf["gen_ppl"] > 4 * real["gen_ppl"], (real["gen_ppl"], shuf["gen_ppl"])


def test_factorized_baseline_keeps_marginals_and_breaks_dependencies(tmp_path):
    """Position 0 is 1 or 2, position 1 repeats it + 10, then EOS: the factorized baseline keeps
    each position's marginal but pairs them independently (about half the samples mismatch)."""
    import numpy as np

    from coupling_dist.data import shards as S
    from coupling_dist.evaluation.factorized import factorized_samples

    T, eos = 6, 99
    rng = np.random.default_rng(0)
    samples = []
    for i in range(400):
        a = int(rng.integers(1, 3))
        tokens = np.array([a, a + 10] + [eos] * (T - 2), dtype=np.int32)
        samples.append({"__key__": f"{i:09d}", "tokens": tokens, "mask": (np.arange(T) < 3).astype(np.uint8)})
    rec = S.write_shard(os.path.join(tmp_path, S.shard_name("train", 0)), samples)
    rec.update(split="train", first_key=samples[0]["__key__"], last_key=samples[-1]["__key__"])
    S.Manifest(kind="preprocess", seq_len=T, shards=[rec], tokenizer={"name": "toy", "vocab_size": 100, "hash": "x"},
               fields={"tokens": {"dtype": "int32", "shape": [T]}, "mask": {"dtype": "uint8", "shape": [T]}}
               ).save(str(tmp_path))

    class Tok:
        eos_token_id = eos

        def __len__(self):
            return 100

        def decode(self, ids):
            return " ".join(map(str, ids))

    sf = factorized_samples(str(tmp_path), Tok(), 2000, seed=1, seq_len=T)
    ids = [r["ids"] for r in sf.records]
    assert all(len(x) == 2 and r["eos"] for x, r in zip(ids, sf.records))
    first = np.array([x[0] for x in ids])
    data_ones = np.mean([s["tokens"][0] == 1 for s in samples])
    assert set(first.tolist()) == {1, 2} and abs((first == 1).mean() - data_ones) < 0.04
    mismatch = np.mean([x[1] != x[0] + 10 for x in ids])
    assert 0.4 < mismatch < 0.6  # the data never mismatches


@pytest.mark.parametrize("content", ["empty", "all_bad"])
def test_evaluation_that_scores_nothing_fails_and_marks_nothing_complete(tmp_path, content):
    """An empty or all-bad samples file: exit 2 with one line naming the file, before any scorer
    starts; no _COMPLETE.json (a stale one from an earlier run is removed), no CSV, no plot."""
    from conftest import DEMO, run_module

    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(b"" if content == "empty" else b'{"txt": "no text field"}\n\n{broken\n')
    out = tmp_path / "eval"
    out.mkdir()
    (out / "_COMPLETE.json").write_text("{}")  # an earlier evaluation's marker
    proc = run_module("coupling_dist.evaluate", "--config", DEMO, f"run.dir={tmp_path}", f"evaluate.samples={samples}",
                      "run.progress=false", check=False, timeout=900)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if content == "empty":
        assert err[0].startswith(f"error: {samples} is empty; nothing was scored")
    else:
        assert err[0].startswith(f"error: {samples} has no valid sample: all 3 line(s) are bad (line 1: missing field 'text')")
    assert not (out / "_COMPLETE.json").exists()
    assert not any(f.endswith((".csv", ".png", "results.json")) for f in os.listdir(out))

"""The DNA domain: the genome-window asset and the other corpus readers (text, .npz, the Fly Brain
pickle through the restricted unpickler), the codec, the patched latent at the paper's ratio
(patch 20: latent length 25), the token-level DNA metrics against ``dna_report``, and the whole
pipeline on a tiny config with every series scored by FBD, k-mer JS and GC content (slow)."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import ROOT, run_module
from coupling_dist.config import ConfigError, load_config
from coupling_dist.data.corpus import CorpusError
from coupling_dist.data.genomes import decode_dna, dna_windows, encode_dna
from coupling_dist.domains import build_domain
from coupling_dist.domains.dna import read_array_file, read_benchmark_pickle, read_sequence_file
from coupling_dist.evaluation.dna_metrics import dna_report, token_metrics
from coupling_dist.models.generator import Generator
from coupling_dist.models.stage_a import StageAModel
from coupling_dist.sampling.onestep import SampleSettings, sample_onestep

DNA_DEMO = os.path.join(ROOT, "configs", "dna_demo.yaml")
SMALL = ["stage_a.flow.layers=2", "stage_a.flow.hidden=32", "stage_a.decoder.width=64", "stage_a.decoder.depth=1",
         "stage_a.decoder.ffn=128", "stage_a.latent_dim=16"]


def test_asset_windows_are_the_genome_windows_shuffled_with_labels():
    cfg = load_config(DNA_DEMO)
    dom = build_domain(cfg)
    items = list(dom.iter_items(dom.corpus_files(), 300))
    tokens, mask, truncated, fields = dom.item_codec().encode_items(items)
    assert tokens.shape == (300, 500) and tokens.dtype == np.int32 and mask.all() and truncated == 0
    assert set(np.unique(tokens)) == {0, 1, 2, 3}
    windows, labels, names = dna_windows(500)
    index = {w: int(lab) for w, lab in zip(windows, labels)}
    seqs = decode_dna(tokens)
    # every row is one of the package's windows with its genome's label; the order is shuffled
    assert [index[s] for s in seqs] == fields["label"].ravel().tolist()
    assert len(set(fields["label"].ravel().tolist())) == len(names) == 7
    ident = dom.tokenizer_identity()
    assert ident["vocab_size"] == 4 and ident["eos_id"] is None and ident["fixed_length"]
    # the base order does not depend on the patch: one shard set serves every stage_a.patch
    assert build_domain(load_config(DNA_DEMO, ["stage_a.patch=10"])).tokenizer_identity() == ident


def test_corpus_readers_and_their_errors(tmp_path):
    good = "ACGT" * 40
    p = tmp_path / "seqs.txt"
    p.write_text(f"{good}\t3\n\n{good.lower()},1\n{good}\n")
    items = list(read_sequence_file(str(p), 160))
    assert [lab for _, lab in items] == [3, 1, 0] and all(np.array_equal(i, encode_dna([good])[0]) for i, _ in items)
    p.write_text(f"{good}\t0\n{good[:-1]}N\t0\n")
    with pytest.raises(CorpusError, match=r"seqs.txt: line 2: the sequence has 'N' at position 159"):
        list(read_sequence_file(str(p), 160))
    p.write_text(f"{good}A\t0\n")
    with pytest.raises(CorpusError, match=r"line 1: 161 bases, but 'data.seq_len' is 160"):
        list(read_sequence_file(str(p), 160))
    # the Fly Brain layout: one-hot [N, L, 4] and one-hot labels, as .npz and as the benchmark pickle
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (5, 160))
    onehot = np.eye(4, dtype=np.float32)[ids]
    y = np.eye(81, dtype=np.float32)[[0, 80, 5, 5, 7]]
    np.savez(tmp_path / "fb.npz", train_data=onehot, y_train=y)
    got = list(read_array_file(str(tmp_path / "fb.npz"), 160))
    assert np.array_equal(np.stack([i for i, _ in got]), ids) and [lab for _, lab in got] == [0, 80, 5, 5, 7]
    for protocol in (2, 4, 5):
        with open(tmp_path / "fb.pkl", "wb") as fh:
            pickle.dump({"train_data": onehot, "y_train": y, "valid_data": onehot[:2], "y_valid": y[:2]}, fh, protocol)
        back = read_benchmark_pickle(str(tmp_path / "fb.pkl"))
        assert sorted(back) == ["train_data", "valid_data", "y_train", "y_valid"] and np.array_equal(back["y_train"], y)
    got = list(read_array_file(str(tmp_path / "fb.pkl"), 160, limit=3))
    assert np.array_equal(np.stack([i for i, _ in got]), ids[:3]) and [lab for _, lab in got] == [0, 80, 5]

    class Evil:  # a pickle that would run a command when loaded
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"train_data": Evil()}, fh)
    with pytest.raises(CorpusError, match=r"refused to load (posix|os)\.system"):
        read_benchmark_pickle(str(tmp_path / "evil.pkl"))
    assert not (tmp_path / "pwned").exists()
    np.savez(tmp_path / "short.npz", x=ids[:, :100], y=np.zeros(5))
    with pytest.raises(CorpusError, match=r"short.npz: 100 bases per sequence, but 'data.seq_len' is 160"):
        list(read_array_file(str(tmp_path / "short.npz"), 160))


def test_config_refusals_name_the_key():
    with pytest.raises(ConfigError, match="data.seq_len"):
        build_domain(load_config(DNA_DEMO, ["data.seq_len=100", "stage_a.patch=10"]))
    with pytest.raises(ConfigError, match="encoder.model"):
        build_domain(load_config(DNA_DEMO, ["encoder.model=tiny:qwen2"]))
    with pytest.raises(ConfigError, match="stage_b.kd.teacher"):
        build_domain(load_config(DNA_DEMO, ["stage_b.kd.teacher=tiny:qwen2"]))
    with pytest.raises(ConfigError, match="must divide 'data.seq_len'"):
        load_config(DNA_DEMO, ["stage_a.patch=30"])


def test_patch_20_shapes_through_stage_a_generator_and_sampling():
    """The paper's ratio 0.05: 500 bases -> 25 latent positions, and back to 500 x 4 logits."""
    cfg = load_config(DNA_DEMO, SMALL)
    torch.manual_seed(0)
    model = StageAModel(0, 4, cfg.stage_a).eval()
    tok = torch.randint(0, 4, (3, 500))
    u = model.encode_latent(tok, None, generator=torch.Generator().manual_seed(0))
    z = model.to_gaussian(u)
    assert u.shape == (3, 25, 16) and torch.allclose(model.from_gaussian(z), u, atol=1e-4)
    assert model.decode(u).shape == (3, 500, 4)
    # latent position 3 reads bases 60..79 only
    tok2 = tok.clone()
    tok2[:, 65] = (tok2[:, 65] + 1) % 4
    diff = (model.posterior(tok2)[0] - model.posterior(tok)[0]).abs().sum(-1)
    assert (diff[:, 3] > 0).all() and diff[:, [i for i in range(25) if i != 3]].max() == 0
    arch = dict(dataclasses.asdict(cfg.stage_b.model), kind="onestep")
    gen = Generator(arch, 16, 500, 8, patch=20).eval()
    meta = {"latent_dim": 16, "seq_len": 500, "vocab_size": 8, "patch": 20, "eos_id": None}
    ids = sample_onestep(gen, meta, range(4), SampleSettings(temperature=1.0, top_p=1.0, latent_scale=1.0, seed=1),
                         batch_size=2, vocab_limit=4)
    assert ids.shape == (4, 500) and int(ids.max()) <= 3
    recs = build_domain(cfg).sample_codec(meta).to_records(ids, range(4), SampleSettings(1.0, 1.0, 1.0))
    assert [len(r["sequence"]) for r in recs] == [500] * 4 and encode_dna([r["sequence"] for r in recs]).tolist() == ids.tolist()


def test_token_metrics_match_dna_report():
    windows, _, _ = dna_windows(500, max_windows=300, seed=1)
    a, b = windows[:100], windows[100:]
    rep, tm = dna_report(a, b), token_metrics(encode_dna(a), encode_dna(b))
    assert all(tm[f"kmer_js_{k}"] == pytest.approx(v, rel=1e-12, abs=1e-15) for k, v in rep["kmer_js"].items())
    assert tm["kmer_js_mean"] == pytest.approx(rep["kmer_js_mean"], rel=1e-12)
    assert tm["gc_mean"] == pytest.approx(rep["gc"]["sample_mean"]) and tm["gc_std"] == pytest.approx(rep["gc"]["sample_std"])
    assert tm["gc_w1"] == pytest.approx(rep["gc"]["wasserstein"], rel=1e-12)


@pytest.mark.slow  # ~80 s alone on 2 cores before the merge of main; ~180 s after it (see the report)
def test_dna_pipeline_end_to_end(tmp_path):
    """preprocess -> ... -> evaluate on 300 real genome windows, a few steps per stage: the samples
    are ACGT strings, every series has FBD, k-mer JS and GC columns, the figures are written."""
    run = tmp_path / "run"
    proc = run_module("coupling_dist.pipeline", "--config", DNA_DEMO, f"run.dir={run}", "data.max_samples=300",
                      "data.shard_size=150", "stage_a.train.steps=12", "stage_a.train.warmup_steps=2",
                      "stage_a.train.eval_interval=12", "stage_a.train.batch_size=16", "stage_b.train.steps=4",
                      "stage_b.train.batch_size=16", "stage_b.train.eval_interval=4", "pair_store.report_samples=64",
                      "sample.num_samples=16", "evaluate.num_samples=30", "evaluate.reference_samples=200",
                      "evaluate.classifier_steps=20", "evaluate.latent_scales=[1.0]", "run.progress=false", *SMALL,
                      timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("sample/samples.jsonl", "sample/gc.png", "eval/results.json", "eval/results.csv", "eval/results.md",
              "eval/kmer_js.png", "eval/classifier/model.safetensors"):
        assert (run / f).is_file(), f
    rec = json.loads((run / "sample/samples.jsonl").read_text().splitlines()[0])
    assert len(rec["sequence"]) == 500 and set(rec["sequence"]) <= set("ACGT")
    res = json.loads((run / "eval/results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"file:samples.jsonl", "onestep_s1_p1_t1", "stage_a_s1_p1_t1", "factorized", "heldout"}
    assert res["metric"] == "classifier_frechet" and res["domain"] == "dna"
    for r in rows.values():
        assert np.isfinite(r["fd_classifier"]) and r["fd_classifier"] >= 0
        for k in range(1, 7):
            assert 0 <= r[f"kmer_js_{k}"] <= 1
        assert 0 < r["gc_mean"] < 1 and r["gc_w1"] >= 0
    # real held-out windows have a closer k-mer spectrum to the training windows than the factorized baseline
    assert rows["heldout"]["kmer_js_mean"] < rows["factorized"]["kmer_js_mean"]
    header = (run / "eval/results.csv").read_text().splitlines()[0].split(",")
    assert {"fd_classifier", "kmer_js_6", "kmer_js_mean", "gc_w1"} <= set(header)
    assert "k-mer JS" in proc.stdout and "heldout" in proc.stdout

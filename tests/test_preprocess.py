"""Preprocessing: corpus readers, tokenization, the split, and real Ray runs (2 workers on a local
instance, a retried crash, a re-run that does nothing, a deleted shard restored byte-identically
through an existing cluster)."""
from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest

from conftest import DEMO, demo_cfg, run_module
from coupling_dist.components import assets, faults
from coupling_dist.data import corpus as C
from coupling_dist.data import shard_job
from coupling_dist.data import shards as S
from coupling_dist.stages.preprocess import work as P

N, SIZE = 200, 32


# --------------------------------------------------------------------------- fast unit tests


def test_corpus_formats_and_errors(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("First sentence.\n\n  Second one.  \n", encoding="utf-8")
    j = tmp_path / "b.jsonl.gz"
    with gzip.open(j, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "Third."}) + "\n\n" + json.dumps({"text": "Fourth.", "id": 3}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Fifth.", None, "Sixth."], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    files = assets.resolve_corpus([str(t), str(tmp_path / "*.gz"), str(tmp_path / "c.parquet")])
    assert list(C.iter_corpus(files)) == ["First sentence.", "Second one.", "Third.", "Fourth.", "Fifth.", "Sixth."]
    assert list(C.iter_corpus(files, limit=3)) == ["First sentence.", "Second one.", "Third."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(C.CorpusError, match=r"bad\.jsonl: line 2: no 'text' field"):
        list(C.iter_file(str(bad)))
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(C.CorpusError, match=r"bad\.jsonl: line 2: invalid JSON"):
        list(C.iter_file(str(bad)))
    with pytest.raises(C.CorpusError, match=r"c\.parquet: no column 'body'"):
        list(C.iter_file(str(tmp_path / "c.parquet"), text_field="body"))
    u = tmp_path / "u.txt"
    u.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(C.CorpusError, match=r"u\.txt: line 2: not valid UTF-8"):
        list(C.iter_file(str(u)))


def test_tokenize_appends_eos_pads_and_truncates(tmp_path):
    w = P.ShardWorker("asset:qwen2.5-tokenizer", 8, str(tmp_path))
    tok = w.tok
    short, long = "The cat sat.", "A much longer sentence that certainly needs more than eight tokens to encode."
    tokens, mask, truncated = w.tokenize([short, long])
    ids = tok(short, add_special_tokens=False)["input_ids"]
    n = len(ids) + 1
    assert tokens.dtype == np.int32 and mask.dtype == np.uint8 and tokens.shape == (2, 8)
    assert tokens[0, :n].tolist() == ids + [151643] and mask[0].tolist() == [1] * n + [0] * (8 - n)
    assert (tokens[0, n:] == tok.pad_token_id).all()
    assert tokens[1].tolist() == tok(long, add_special_tokens=False)["input_ids"][:8] and mask[1].all()
    assert truncated == 1
    # tokens only (encoder.model: null): a shard with tokens and mask, no features
    os.makedirs(tmp_path / shard_job.PARTS)
    rec = w.process({"name": "shard-train-00000.tar", "split": "train", "keys": ["000000000", "000000001"],
                     "texts": [short, long], "fingerprint": "f"})
    got = S.read_shard(str(tmp_path / "shard-train-00000.tar"))
    assert rec["count"] == 2 and set(got[0]) == {"__key__", "tokens", "mask"}
    assert np.array_equal(got[1]["tokens"], tokens[1])
    assert json.load(open(shard_job.sidecar_path(str(tmp_path), rec["name"])))["sha256"] == rec["sha256"]


def test_split_plan_is_deterministic():
    plan, held = P.make_plan(1000, 0.05, 64, "fp")
    assert int(held.sum()) == 50
    again, held2 = P.make_plan(1000, 0.05, 100, "fp")  # the split does not depend on the shard size
    assert np.array_equal(held, held2)
    assert sum(e["count"] for e in plan) == 1000
    assert [e["name"] for e in plan if e["split"] == "heldout"] == ["shard-heldout-00000.tar"]
    assert [e["count"] for e in plan if e["split"] == "train"] == [64] * 14 + [950 - 14 * 64]
    assert len({e["fingerprint"] for e in plan}) == len(plan)
    assert P.make_plan(1000, 0.0, 64, "fp")[1].sum() == 0


# --------------------------------------------------------------------------- real Ray runs


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Run 1: 2 Ray workers on a local instance; the worker that starts shard-train-00002 dies once."""
    tmp = tmp_path_factory.mktemp("pp")
    cfg = demo_cfg(tmp, f"data.max_samples={N}", f"data.shard_size={SIZE}", "ray.num_workers=2")
    rec = _Records()
    lg = logging.getLogger("coupling_dist")
    lg.addHandler(rec)
    lg.setLevel(logging.INFO)
    os.environ[faults.ENV] = faults.spec("preprocess.shard", shard="shard-train-00002.tar", once=tmp / "fault-once")
    try:
        path = P.preprocess(cfg)
    finally:
        del os.environ[faults.ENV]
        lg.removeHandler(rec)
    return {"cfg": cfg, "tmp": tmp, "path": path, "log": rec.lines}


def _mtimes(d):
    return {f: os.stat(os.path.join(root, f)).st_mtime_ns for root, _, fs in os.walk(d) for f in fs}


def test_shards_manifest_and_counts(made):
    cfg, d = made["cfg"], made["cfg"].data_dir
    man = S.Manifest.load(made["path"])
    assert made["path"] == os.path.join(d, "manifest.json") and man.kind == "preprocess"
    held = round(N * cfg.data.heldout_fraction)
    assert man.splits == {"train": N - held, "heldout": held} and man.seq_len == 32
    assert [s["count"] for s in man.split_shards("train")] == [32] * 5 + [N - held - 160]
    assert man.fields == {"tokens": {"dtype": "int32", "shape": [32]}, "mask": {"dtype": "uint8", "shape": [32]},
                          "features": {"dtype": "float16", "shape": [32, 64]}}
    assert man.tokenizer["hash"] == assets.tokenizer_identity(cfg.data.tokenizer)["hash"]
    assert man.encoder["name"] == "tiny:qwen2" and man.encoder["hash"] == assets.identity("tiny:qwen2")["hash"]
    assert man.verify(d, checksums=True) == []
    assert sorted(f for f in os.listdir(d) if f.endswith(".tar")) == sorted(s["name"] for s in man.shards)
    # the retried crash, and both workers really used
    assert any("shard-train-00002.tar: attempt 1 failed" in line for line in made["log"]), made["log"]
    pids = {json.load(open(shard_job.sidecar_path(d, s["name"])))["pid"] for s in man.shards}
    assert len(pids) >= 2
    # every corpus sentence exactly once, keyed by its corpus index, with the right tokens
    texts = list(C.iter_corpus(assets.resolve_corpus(cfg.data.corpus), limit=N))
    tok = assets.load_tokenizer(cfg.data.tokenizer)
    samples = [x for s in man.shards for x in S.read_shard(os.path.join(d, s["name"]), specs=man.fields)]
    assert sorted(int(x["__key__"]) for x in samples) == list(range(N))
    for x in samples[::17]:
        ids = (tok(texts[int(x["__key__"])], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:32]
        assert x["tokens"][:len(ids)].tolist() == ids and int(x["mask"].sum()) == len(ids)
    # features = the frozen encoder's last hidden state on the padded ids with full attention (the
    # text, its EOS, then pad ids: pads hold the LM's own features there), checked against a plain
    # transformers forward of the causal LM; the manifest says so
    assert man.encoder["pad_features"] == "full_attention"
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(assets.resolve("tiny:qwen2"), local_files_only=True).eval()
    batch = samples[:4]
    with torch.no_grad():
        ids = torch.from_numpy(np.stack([x["tokens"] for x in batch])).long()
        h = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    for i, x in enumerate(batch):
        assert np.allclose(x["features"].astype(np.float32), h[i].numpy(), atol=2e-3, rtol=2e-3)
    pads = np.concatenate([x["features"][~x["mask"].astype(bool)] for x in batch])
    assert len(pads) and np.abs(pads).max() > 0.1  # pad positions carry features, not zeros


def test_second_run_does_no_work(made):
    d = made["cfg"].data_dir
    before = _mtimes(d)
    proc = run_module("coupling_dist.preprocess", "--config", DEMO, f"run.dir={made['tmp']}", "run.wandb.mode=disabled",
                      "run.progress=false", f"data.max_samples={N}", f"data.shard_size={SIZE}", timeout=300)
    assert "7 done, 0 to write" in proc.stderr and "nothing to do" in proc.stderr
    assert "Ray" not in proc.stderr and "wrote shard" not in proc.stderr
    assert _mtimes(d) == before
    marker = json.load(open(os.path.join(made["tmp"], "preprocess", "_COMPLETE.json")))
    assert marker["summary"]["shards"] == 7 and marker["summary"]["samples_train"] == N - 10


def test_deleted_shard_restored_byte_identical_on_existing_cluster(made, ray_head):
    cfg, d = made["cfg"], made["cfg"].data_dir
    name = "shard-train-00003.tar"
    original = open(os.path.join(d, name), "rb").read()
    manifest_before = S.Manifest.load(d).to_dict()["shards"]
    os.remove(os.path.join(d, name))
    before = _mtimes(d)
    cfg2 = demo_cfg(made["tmp"], f"data.max_samples={N}", f"data.shard_size={SIZE}", f"ray.address={ray_head['address']}")
    rec = _Records()
    logging.getLogger("coupling_dist").addHandler(rec)
    try:
        P.preprocess(cfg2)
    finally:
        logging.getLogger("coupling_dist").removeHandler(rec)
    assert open(os.path.join(d, name), "rb").read() == original
    after = _mtimes(d)
    changed = sorted(f for f in after if after[f] != before.get(f))
    assert changed == sorted([name, name + ".json", "manifest.json"]), changed  # nothing else rewritten
    assert S.Manifest.load(d).to_dict()["shards"] == manifest_before
    assert any("6 done, 1 to write" in line for line in rec.lines)
    assert any(f"connecting to the Ray cluster at {ray_head['address']}" in line for line in rec.lines)


def test_other_settings_are_refused(made):
    cfg = demo_cfg(made["tmp"], f"data.max_samples={N}", f"data.shard_size={SIZE}", "data.seq_len=16")
    with pytest.raises(P.PreprocessError, match=r"other settings \(differing: \['seq_len'\]\)"):
        P.preprocess(cfg)

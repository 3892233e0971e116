"""The reward classifier entry (``python -m coupling_dist.classifier``) on a tiny real MNIST shard
set, its refusals, and labelled text corpora (``data.label_field``): the shard field ``label``, the
errors naming file and line / row, and unlabelled text left exactly as it was."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import DEMO, ROOT, run_module
from coupling_dist.cli import run_entry
from coupling_dist.config import ConfigError, load_config
from coupling_dist.data import corpus as C
from coupling_dist.data import shards as S
from coupling_dist.domains import build_domain
from coupling_dist.stages.classifier.entry import main as classifier_main

MNIST_DEMO = os.path.join(ROOT, "configs", "mnist_demo.yaml")
N_TRAIN, N_HELD = 600, 100


def write_mnist_shards(run_dir: str, n_train: int = N_TRAIN, n_held: int = N_HELD, label=None, fields=True) -> str:
    """Real digits as a preprocessed shard set (4x4-patch order, the domain's identity), without Ray.
    ``label``: every item gets this label; ``fields=False``: no label field at all."""
    from coupling_dist.data.mnist import load_mnist_5k

    dom = build_domain(load_config(MNIST_DEMO, [f"run.dir={run_dir}"]))
    pixels, labels = load_mnist_5k()
    order = np.random.default_rng(0).permutation(len(labels))  # the asset is sorted by digit
    out = os.path.join(run_dir, "data")
    os.makedirs(out, exist_ok=True)
    shards, i = [], 0
    for split, n in (("train", n_train), ("heldout", n_held)):
        samples = []
        for _ in range(n):
            s = {"__key__": f"{i:09d}", "tokens": dom.codec.to_tokens(pixels[order[i]]).astype(np.int32),
                 "mask": np.ones(784, dtype=np.uint8)}
            if fields:
                s["label"] = np.array([labels[order[i]] if label is None else label], dtype=np.int16)
            samples.append(s)
            i += 1
        if samples:
            rec = S.write_shard(os.path.join(out, S.shard_name(split, 0)), samples)
            rec.update(split=split, first_key=samples[0]["__key__"], last_key=samples[-1]["__key__"])
            shards.append(rec)
    spec = {"tokens": {"dtype": "int32", "shape": [784]}, "mask": {"dtype": "uint8", "shape": [784]}}
    if fields:
        spec["label"] = {"dtype": "int16", "shape": [1]}
    S.Manifest(kind="preprocess", seq_len=784, shards=shards, fields=spec, tokenizer=dom.tokenizer_identity(),
               extra={"fingerprint": "test"}).save(out)
    return out


def run_classifier(capsys, run_dir, *overrides):
    code = run_entry("classifier", classifier_main, ["--config", MNIST_DEMO, f"run.dir={run_dir}",
                                                     "run.progress=false", *overrides])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, err


def test_classifier_trains_on_mnist_shards_and_is_loadable_as_the_reward(tmp_path):
    write_mnist_shards(str(tmp_path))
    proc = run_module("coupling_dist.classifier", "--config", MNIST_DEMO, f"run.dir={tmp_path}", "run.progress=false",
                      "classifier.steps=80", "classifier.batch_size=64", timeout=600)
    out = tmp_path / "classifier" / "export"
    assert sorted(os.listdir(out)) == ["feature_net.json", "model.safetensors"], proc.stderr[-2000:]
    doc = json.loads((out / "feature_net.json").read_text())
    arch, meta = doc["arch"], doc["meta"]
    # a different network from the evaluation classifier (width 32, seed run.seed = 0)
    assert arch == {"kind": "digit2d", "n_classes": 10, "vocab": 2, "length": 784, "width": 64}
    assert meta["role"] == "reward" and meta["seed"] == 1 and meta["steps"] == 80 and meta["soft_fraction"] == 0.5
    assert meta["n_train"] == N_TRAIN and meta["n_heldout"] == N_HELD and meta["heldout"] == "heldout split"
    assert 0.5 < meta["heldout_acc"] <= 1.0, meta  # chance is 0.1
    marker = json.loads((tmp_path / "classifier" / "_COMPLETE.json").read_text())
    assert marker["summary"]["heldout_acc"] == meta["heldout_acc"]
    assert marker["provenance"]["config"]["classifier.width"] == 64
    # the reward reads it from the stage directory, and recomputes its held-out accuracy on raster ids
    import torch

    from coupling_dist.guidance.reward import load_reward
    from coupling_dist.stages.classifier.preflight import read_split

    cfg = load_config(MNIST_DEMO, [f"run.dir={tmp_path}"])
    dom = build_domain(cfg)
    reward = load_reward(str(tmp_path / "classifier"), dom, {"seq_len": 784, "vocab_size": 8})
    held, y = read_split(cfg, dom, "heldout")
    with torch.no_grad():
        pred = reward.net(torch.from_numpy(held)).argmax(1).numpy()
    assert float((pred == y).mean()) == meta["heldout_acc"]


@pytest.mark.parametrize("case", ["no_shards", "no_label_field", "one_class", "label_range", "other_patch", "text"])
def test_classifier_refuses_bad_inputs_with_one_clear_line(tmp_path, capsys, case):
    over = []
    if case == "no_label_field":
        write_mnist_shards(str(tmp_path), 20, 5, fields=False)
    elif case == "one_class":
        write_mnist_shards(str(tmp_path), 20, 5, label=3)
    elif case == "label_range":
        write_mnist_shards(str(tmp_path), 20, 5, label=12)
    elif case == "other_patch":
        write_mnist_shards(str(tmp_path), 20, 5)
        over = ["stage_a.patch=4"]
    elif case == "text":
        over = ["data.domain=text", "data.seq_len=32", "stage_a.patch=1", "stage_a.pad_positions=passthrough"]
    code, err = run_classifier(capsys, tmp_path, *over)
    data = os.path.join(str(tmp_path), "data")
    want = {
        "no_shards": f"no preprocessed shard set at {data}: run `python -m coupling_dist.preprocess --config FILE`",
        "no_label_field": f"{data}/manifest.json: the shards have no 'label' field",
        "one_class": f"{data}/manifest.json: every one of the 20 training items has label 3; a classifier needs at "
                     f"least 2 classes",
        "label_range": "have label 12, but data.domain binary_image has 10 classes",
        "other_patch": "the shards were made as 'binary-image:28x28:patch4x4'",
        "text": "data.domain 'text' has no reward classifier",
    }[case]
    assert code == 2 and len(err) == 1 and want in err[0], err
    assert not os.path.exists(tmp_path / "classifier" / "_COMPLETE.json")
    assert not os.path.exists(tmp_path / "classifier" / "export")


# --------------------------------------------------------------------------- labelled text


def _preprocess_in_process(cfg, monkeypatch):
    """preprocess with the shard workers run in this process (no Ray): the same plan, codec and manifest."""
    from coupling_dist.stages.preprocess import work as P

    def run_tasks(cfg, tasks, n_tasks, out_dir, enc):
        w = P.ShardWorker(build_domain(cfg).item_codec(), cfg.data.seq_len, out_dir, enc)
        return [w.process(t) for t in tasks]

    monkeypatch.setattr(P, "run_tasks", run_tasks)
    return S.Manifest.load(os.path.dirname(P.preprocess(cfg)))


def test_text_label_column_round_trip_and_unlabelled_text_unchanged(tmp_path, monkeypatch):
    corpus = tmp_path / "docs.jsonl"
    docs = [{"text": f"Sentence number {i} is about topic {i % 3}.", "label": i % 3, "extra": "x"} for i in range(40)]
    docs.insert(5, {"text": "   ", "label": "blank rows are skipped, label unchecked"})
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    base = [f"data.corpus={corpus}", "encoder.model=null", "data.shard_size=16", "run.progress=false"]
    lab = load_config(DEMO, [f"run.dir={tmp_path / 'a'}", "data.label_field=label", *base])
    man = _preprocess_in_process(lab, monkeypatch)
    assert man.fields["label"] == {"dtype": "int16", "shape": [1]} and man.extra["settings"]["label_field"] == "label"
    got = {}
    for s in man.shards:
        for x in S.read_shard(os.path.join(lab.data_dir, s["name"]), specs=man.fields):
            got[int(x["__key__"])] = (x["tokens"], x["mask"], int(x["label"][0]))
    kept = [d for d in docs if d["text"].strip()]
    assert [got[i][2] for i in sorted(got)] == [d["label"] for d in kept]
    # label_field null: no label field, no settings key, the unlabelled codec (the tokenizer reference)
    plain = load_config(DEMO, [f"run.dir={tmp_path / 'b'}", *base])
    assert build_domain(plain).item_codec() == plain.data.tokenizer and build_domain(plain).settings_extra() == {}
    man2 = _preprocess_in_process(plain, monkeypatch)
    assert set(man2.fields) == {"tokens", "mask"} and "label_field" not in man2.extra["settings"]
    for s in man2.shards:
        for x in S.read_shard(os.path.join(plain.data_dir, s["name"]), specs=man2.fields):
            t, m, _ = got[int(x["__key__"])]
            assert np.array_equal(x["tokens"], t) and np.array_equal(x["mask"], m)


def test_text_label_errors_name_file_and_line_or_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def first(path, **kw):
        return list(C.iter_file(str(path), "auto", "text", "label", **kw))

    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "ok", "label": 1}\n\n{"text": "no label"}\n')
    with pytest.raises(C.CorpusError, match=rf"{j}: line 3: no 'label' label \(data.label_field\)"):
        first(j)
    j.write_text('{"text": "ok", "label": 1}\n{"text": "bad", "label": "2"}\n')
    with pytest.raises(C.CorpusError, match=rf"{j}: line 2: 'label' is '2' \(str\), not an int class label"):
        first(j)
    j.write_text('{"text": "ok", "label": 2.0}\n')
    with pytest.raises(C.CorpusError, match=r"line 1: 'label' is 2.0 \(float\)"):
        first(j)
    j.write_text('{"text": "ok", "label": -1}\n')
    with pytest.raises(C.CorpusError, match=r"line 1: 'label' is -1; class labels must lie in \[0, 32767\]"):
        first(j)
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, None, 1]}), str(p))
    with pytest.raises(C.CorpusError, match=rf"{p}: row 2: no 'label' label"):
        first(p)
    pq.write_table(pa.table({"text": ["a", "b"], "y": [0, 1]}), str(p))
    with pytest.raises(C.CorpusError, match=r"no column 'label' \(columns: \['text', 'y'\]\); set data.label_field"):
        first(p)
    pq.write_table(pa.table({"text": ["a", "b"], "label": [4, 7]}), str(p))
    assert first(p) == [("a", 4), ("b", 7)]
    t = tmp_path / "c.txt"
    t.write_text("plain line\n")
    with pytest.raises(C.CorpusError, match=r"a plain-text corpus has no label column"):
        first(t)
    with pytest.raises(ConfigError, match=r"'data.label_field' = 'label' names a label column of JSONL / Parquet"):
        load_config(MNIST_DEMO, ["data.label_field=label"])


def test_ranks_other_than_0_leave_the_training_to_rank_0(tmp_path, monkeypatch):
    """Under torchrun / srun the entry is one process's work: rank 1 returns at once, writes nothing."""
    write_mnist_shards(str(tmp_path), 20, 5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(MNIST_DEMO, [f"run.dir={tmp_path}"])
    assert classifier_main(cfg) == {"rank": 1, "skipped": "rank 0 trains the classifier"}
    assert not os.path.exists(tmp_path / "classifier")

"""The shard format: deterministic bytes, plain-tool readability, atomic writes, clear read errors."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from coupling_dist.data import shards as S
from data_helpers import make_shard_set, sample


def _samples(n=5, start=0, dtype="float16"):
    return [sample(start + i, dtype=dtype) for i in range(n)]


def test_round_trip_and_dtypes(tmp_path):
    for dtype in ("float16", "bfloat16", "float32"):
        p = str(tmp_path / f"s-{dtype}.tar")
        src = _samples(4, dtype=dtype)
        rec = S.write_shard(p, src)
        assert rec["count"] == 4 and rec["bytes"] == os.path.getsize(p) and rec["sha256"] == S.sha256_file(p)
        got = S.read_shard(p)
        assert [g["__key__"] for g in got] == [s["__key__"] for s in src]
        for g, s in zip(got, src):
            for f in ("tokens", "mask", "features"):
                assert g[f].dtype == s[f].dtype and np.array_equal(g[f], s[f])
        assert got[0]["features"].dtype == S.stored_dtype(dtype)
    only = S.read_shard(p, fields=["tokens"])
    assert set(only[0]) == {"__key__", "tokens"}


def test_bytes_are_deterministic_and_members_sorted(tmp_path):
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    src = _samples(6)
    S.write_shard(a, src)
    S.write_shard(b, list(reversed(src)))  # input order does not matter: members are sorted
    assert open(a, "rb").read() == open(b, "rb").read()
    names = subprocess.run(["tar", "-tf", a], capture_output=True, text=True, check=True).stdout.split()
    assert names == sorted(names) and names[0] == "000000000.features.npy.zst"
    verbose = subprocess.run(["tar", "-tvf", a], capture_output=True, text=True, check=True).stdout
    assert "0/0" in verbose and "1970-01-01" in verbose  # fixed owner and mtime in every header


def test_readable_with_tar_and_zstd_alone(tmp_path):
    p = str(tmp_path / "shard-train-00000.tar")
    src = _samples(3)
    S.write_shard(p, src)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", p, "-C", str(out)], check=True)
    member = out / "000000002.tokens.npy.zst"
    subprocess.run(["zstd", "-q", "-d", str(member), "-o", str(out / "t.npy")], check=True)
    arr = np.load(out / "t.npy", allow_pickle=False)
    assert np.array_equal(arr, src[2]["tokens"])


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    p = str(tmp_path / "shard-train-00000.tar")
    src = _samples(4)
    S.write_shard(p, src)

    def npy_zst(key, data):
        return S.decode_array(data) if key.endswith(".npy.zst") else None

    ds = wds.WebDataset(p, shardshuffle=False).decode(npy_zst)
    got = list(ds)
    assert [g["__key__"] for g in got] == [s["__key__"] for s in src]
    assert np.array_equal(got[1]["features.npy.zst"], src[1]["features"])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    p = str(tmp_path / "bad.tar")
    with pytest.raises(ValueError, match="object"):
        S.write_shard(p, [{"__key__": "000000001", "x": np.array([{"a": 1}], dtype=object)}])
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="field name"):
        S.write_shard(p, [{"__key__": "000000001", "a.b": np.zeros(2)}])
    assert os.listdir(tmp_path) == []


def test_read_errors_name_shard_and_key(tmp_path):
    p = str(tmp_path / "shard-train-00000.tar")
    S.write_shard(p, _samples(4))
    data = open(p, "rb").read()
    # truncated in the middle of a member's data
    t = str(tmp_path / "shard-train-00001.tar")
    open(t, "wb").write(data[: len(data) // 2])
    with pytest.raises(S.ShardError, match=r"shard shard-train-00001\.tar, sample key 00000000\d.*truncated") as ei:
        S.read_shard(t)
    assert ei.value.key is not None
    last = S.index_shard(p).members["000000003"]["tokens"]
    # every cut before the end-of-archive block is detected from the content alone (later cuts,
    # in tar's zero padding, leave a valid archive: those are caught by the manifest size check)
    for cut in range(512, last[0] + last[1] + 512, 509):
        open(t, "wb").write(data[:cut])
        with pytest.raises(S.ShardError, match=r"shard-train-00001\.tar.*(truncated|damaged)"):
            S.read_shard(t)
    # corrupted zstd frame: flip bytes inside the payload of one member
    idx = S.index_shard(p)
    off, size = idx.members["000000002"]["features"]
    bad = bytearray(data)
    for i in range(off + size // 2, off + size // 2 + 8):
        bad[i] ^= 0xFF
    c = str(tmp_path / "shard-train-00002.tar")
    open(c, "wb").write(bytes(bad))
    with pytest.raises(S.ShardError, match=r"shard-train-00002\.tar, sample key 000000002: field 'features': corrupted zstd"):
        S.read_shard(c)
    # wrong shape / dtype against a spec
    with pytest.raises(S.ShardError, match=r"sample key 000000000: field 'tokens': shape \[8\] but the manifest says \[9\]"):
        S.read_shard(p, specs={"tokens": {"dtype": "int32", "shape": [9]}})
    with pytest.raises(S.ShardError, match=r"sample key 000000000: field 'features': dtype float16 but the manifest says bfloat16"):
        S.read_shard(p, specs={"features": {"dtype": "bfloat16", "shape": [8, 4]}})
    with pytest.raises(S.ShardError, match=r"shard-train-00009\.tar.*missing from disk"):
        S.read_shard(str(tmp_path / "shard-train-00009.tar"))


def test_manifest_round_trip_and_errors(tmp_path):
    d = str(tmp_path / "set")
    man = make_shard_set(d, n_train=20, n_heldout=4, shard_size=8)
    back = S.Manifest.load(d)
    assert back.splits == {"train": 20, "heldout": 4} and back.num_samples() == 24
    assert [s["name"] for s in back.split_shards("train")] == ["shard-train-00000.tar", "shard-train-00001.tar",
                                                               "shard-train-00002.tar"]
    assert back.to_dict()["shards"] == man.to_dict()["shards"]
    assert back.verify(d, checksums=True) == []
    assert not [f for f in os.listdir(d) if ".tmp." in f]
    os.remove(os.path.join(d, "shard-train-00001.tar"))
    with open(os.path.join(d, "shard-train-00002.tar"), "ab") as fh:
        fh.write(b"\0" * 512)
    problems = back.verify(d)
    assert any("shard-train-00001.tar: missing" in p for p in problems)
    assert any("shard-train-00002.tar" in p and "bytes on disk" in p for p in problems)
    # malformed manifests name the file and the key
    raw = json.load(open(os.path.join(d, "manifest.json")))
    del raw["seq_len"]
    json.dump(raw, open(os.path.join(d, "manifest.json"), "w"))
    with pytest.raises(S.ManifestError, match=r"manifest\.json: missing key\(s\) \['seq_len'\]"):
        S.Manifest.load(d)
    with pytest.raises(S.ManifestError, match="no manifest"):
        S.Manifest.load(str(tmp_path / "nowhere"))


def test_for_pairs_checks_the_files(tmp_path):
    d = str(tmp_path)
    rec = S.write_shard(os.path.join(d, "shard-train-00000.tar"), _samples(3))
    rec["split"] = "train"
    fields = {"tokens": {"dtype": "int32", "shape": [8]}}
    man = S.Manifest.for_pairs(d, [rec], fields=fields, seq_len=8, tokenizer={"hash": "h"}, encoder={},
                               extra={"kind": "pair_store", "latent_dim": 4})
    man.save(d)
    back = S.Manifest.load(d).to_dict()
    assert back["kind"] == "pair_store" and back["latent_dim"] == 4 and back["num_samples"] == 3
    rec2 = dict(rec, bytes=rec["bytes"] + 1)
    with pytest.raises(S.ManifestError, match="shard-train-00000.tar is missing or not"):
        S.Manifest.for_pairs(d, [rec2], fields=fields, seq_len=8, tokenizer={}, encoder={})

"""ShardLoader: order = f(seed, epoch, step), rank slicing over real gloo ranks, exact resume at any
world size, DataLoader workers, and an error (naming shard and key) for every kind of bad data."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import torchrun
from coupling_dist.data import shards as S
from coupling_dist.data.loader import ShardLoader, permute
from data_helpers import make_shard_set, sample

B = 8  # global batch; 50 train samples -> 6 steps per epoch, 2 samples dropped per epoch


@pytest.fixture
def shard_dir(tmp_path):
    d = str(tmp_path / "set")
    make_shard_set(d, n_train=50, n_heldout=6, shard_size=8)
    return d


def stream(d, steps, world=1, rank=0, state=None, seed=0, **kw):
    loader = ShardLoader(d, "train", B, seed, rank, world, with_keys=True, **kw)
    if state is not None:
        loader.load_state_dict(state)
    out, it = [], iter(loader)
    while len(out) < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        out.append(batch)
    return out, loader


def keys(batches):
    return [b["__key__"] for b in batches]


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 65, 1000, 4099):
        for epoch in (0, 1):
            p = permute(np.arange(n), n, seed=5, epoch=epoch)
            assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, 0, 0), permute(np.arange(100), 100, 0, 1))
    assert not np.array_equal(permute(np.arange(100), 100, 0, 0), permute(np.arange(100), 100, 1, 0))


def test_order_epochs_contents_and_rank_slices(shard_dir):
    batches, loader = stream(shard_dir, 14)
    assert loader.steps_per_epoch == 6 and loader.step == 14 and loader.epoch == 2
    ks = keys(batches)
    for e in range(2):
        epoch_keys = [k for b in ks[6 * e:6 * e + 6] for k in b]
        assert len(epoch_keys) == 48 and len(set(epoch_keys)) == 48  # each sample at most once per epoch
    assert ks[0:6] != ks[6:12]  # a new permutation every epoch
    for b in batches:  # the rows really are the samples the keys name
        for i, k in enumerate(b["__key__"]):
            want = sample(int(k))
            assert torch.equal(b["tokens"][i], torch.from_numpy(want["tokens"]))
            assert torch.equal(b["features"][i], torch.from_numpy(want["features"]))
        assert b["tokens"].dtype == torch.int32 and b["mask"].dtype == torch.uint8
    again, _ = stream(shard_dir, 14)
    assert keys(again) == ks
    other_seed, _ = stream(shard_dir, 6, seed=1)
    assert keys(other_seed) != ks[:6]
    assert [[k for _, k in loader.keys(s, global_batch=True)] for s in range(14)] == ks
    # rank slices at world 4: contiguous, disjoint, union = the global batch in order
    parts = [keys(stream(shard_dir, 14, world=4, rank=r)[0]) for r in range(4)]
    for s in range(14):
        assert sum((p[s] for p in parts), []) == ks[s]
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        ShardLoader(shard_dir, "train", B, 0, 0, 3)
    # a split smaller than one global batch yields nothing (every rank alike)
    assert list(ShardLoader(shard_dir, "heldout", B, 0, 0, 1)) == []
    assert len(list(ShardLoader(shard_dir, "heldout", 2, 0, 0, 1))) == 3


def test_dataloader_workers_give_the_same_stream(shard_dir):
    ref, _ = stream(shard_dir, 9, world=2, rank=1)
    got, loader = stream(shard_dir, 9, world=2, rank=1, num_workers=2)
    assert keys(got) == keys(ref) and loader.step == 9
    for a, b in zip(ref, got):
        assert all(torch.equal(a[f], b[f]) for f in ("tokens", "mask", "features"))


def test_two_ranks_over_gloo_and_resume_across_world_sizes(shard_dir, tmp_path):
    full, _ = stream(shard_dir, 14)
    ref = keys(full)
    _, l1 = stream(shard_dir, 4)
    state_w1 = l1.state_dict()
    assert state_w1["step"] == 4
    out = str(tmp_path / "w2.json")
    torchrun(2, ["tests/loader_worker.py", "--dir", shard_dir, "--batch", str(B), "--steps", "14",
                 "--save-at", "9", "--resume-state", json.dumps(state_w1), "--resume-steps", "7",
                 "--workers", "1", "--out", out], timeout=300)
    res = json.load(open(out))
    assert res["world"] == 2 and res["steps_per_epoch"] == 6
    for s, (r0, r1) in enumerate(res["phase1"]):  # disjoint halves whose union is the global batch
        assert len(r0) == len(r1) == B // 2 and not set(r0) & set(r1)
        assert r0 + r1 == ref[s]
    # 1 -> 2: a state saved at world 1 after 4 steps, resumed on 2 ranks (crossing an epoch end)
    assert [r0 + r1 for r0, r1 in res["phase2"]] == ref[4:11]
    # 2 -> 1: rank 0's state saved at step 9 on 2 ranks, resumed on one
    assert res["saved"]["step"] == 9
    resumed, l2 = stream(shard_dir, 5, state=res["saved"])
    assert keys(resumed) == ref[9:14] and l2.step == 14
    # same world size: resume at k equals the uninterrupted stream
    same, _ = stream(shard_dir, 10, state=state_w1)
    assert keys(same) == ref[4:14]


def test_state_must_match(shard_dir):
    loader = ShardLoader(shard_dir, "train", B, 0, 0, 1)
    with pytest.raises(ValueError, match="global_batch_size=16"):
        loader.load_state_dict({"step": 3, "seed": 0, "global_batch_size": 16, "num_samples": 50})
    loader.load_state_dict({"step": 3})
    assert loader.step == 3


def test_bfloat16_and_field_selection(tmp_path):
    d = str(tmp_path / "bf")
    make_shard_set(d, n_train=16, n_heldout=0, shard_size=8, dtype="bfloat16")
    b = next(iter(ShardLoader(d, "train", 4, 0, 0, 1, with_keys=True)))
    assert b["features"].dtype == torch.bfloat16
    want = torch.from_numpy(sample(int(b["__key__"][0]), dtype="bfloat16")["features"]).view(torch.bfloat16)
    assert torch.equal(b["features"][0], want)
    only = next(iter(ShardLoader(d, "train", 4, 0, 0, 1, fields=["tokens"])))
    assert set(only) == {"tokens"}
    with pytest.raises(S.ManifestError, match=r"no field\(s\) \['z'\]"):
        ShardLoader(d, "train", 4, 0, 0, 1, fields=["z"])
    with pytest.raises(S.ManifestError, match="no shards for split 'heldout'"):
        ShardLoader(d, "heldout", 4, 0, 0, 1)


# --------------------------------------------------------------------------- bad data


def _set_entry(d, name, **changes):
    path = os.path.join(d, "manifest.json")
    m = json.load(open(path))
    for s in m["shards"]:
        if s["name"] == name:
            s.update(changes)
    json.dump(m, open(path, "w"))


def _rewrite(d, name, samples):
    """Replace a shard's file and keep the manifest consistent in size and checksum."""
    rec = S.write_shard(os.path.join(d, name), samples)
    _set_entry(d, name, bytes=rec["bytes"], sha256=rec["sha256"])


def _read_all(d, **kw):
    loader = ShardLoader(d, "train", B, 0, 0, 1, **kw)
    return [b for _ in range(2) for b in loader], loader


def test_missing_shard(shard_dir):
    os.remove(os.path.join(shard_dir, "shard-train-00002.tar"))
    with pytest.raises(S.ShardError, match=r"shard shard-train-00002\.tar, sample key 000000016\.\.000000023: missing from disk"):
        ShardLoader(shard_dir, "train", B, 0, 0, 1)
    batches, loader = _read_all(shard_dir, skip_bad=True)
    drawn = sum(16 <= p <= 23 for s in range(12) for p in loader.global_positions(s))  # shard 2 = positions 16..23
    assert drawn > 0 and loader.skipped == drawn
    assert sum(len(b["tokens"]) for b in batches) == 12 * B - drawn


def test_truncated_tar(shard_dir):
    p = os.path.join(shard_dir, "shard-train-00001.tar")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:3000])
    # the manifest's size catches it at construction; the message names the first damaged key
    with pytest.raises(S.ShardError, match=r"shard-train-00001\.tar.*manifest mismatch: 3000 bytes on disk.*first damaged sample key 00000000\d"):
        ShardLoader(shard_dir, "train", B, 0, 0, 1)
    # a manifest rewritten to the truncated size: caught when the shard is indexed
    _set_entry(shard_dir, "shard-train-00001.tar", bytes=3000)
    with pytest.raises(S.ShardError, match=r"shard shard-train-00001\.tar, sample key 00000000\d: truncated"):
        _read_all(shard_dir)


def test_corrupted_zstd_frame(shard_dir):
    p = os.path.join(shard_dir, "shard-train-00003.tar")
    off, size = S.index_shard(p).members["000000027"]["features"]
    data = bytearray(open(p, "rb").read())
    for i in range(off + size // 2, off + size // 2 + 6):
        data[i] ^= 0x5A
    open(p, "wb").write(bytes(data))  # same size: only the content check can see it
    with pytest.raises(S.ShardError, match=r"shard-train-00003\.tar, sample key 000000024\.\.000000031: manifest mismatch: sha256"):
        ShardLoader(shard_dir, "train", B, 0, 0, 1, verify_checksums=True)
    with pytest.raises(S.ShardError, match=r"shard shard-train-00003\.tar, sample key 000000027: field 'features': corrupted zstd frame"):
        _read_all(shard_dir)
    batches, loader = _read_all(shard_dir, skip_bad=True)
    drawn = sum(k == "000000027" for s in range(12) for _, k in loader.keys(s, global_batch=True))
    assert loader.skipped == drawn and sum(len(b["mask"]) for b in batches) == 12 * B - drawn


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_wrong_shape_or_dtype(shard_dir, what):
    samples = [sample(i) for i in range(32, 40)]
    if what == "shape":
        samples[3]["tokens"] = np.zeros(5, dtype=np.int32)
        msg = r"sample key 000000035: field 'tokens': shape \[5\] but the manifest says \[8\]"
    else:
        samples[3]["mask"] = samples[3]["mask"].astype(np.int64)
        msg = r"sample key 000000035: field 'mask': dtype int64 but the manifest says uint8"
    _rewrite(shard_dir, "shard-train-00004.tar", samples)
    with pytest.raises(S.ShardError, match=r"shard shard-train-00004\.tar, " + msg):
        _read_all(shard_dir)
    _, loader = _read_all(shard_dir, skip_bad=True)
    assert loader.skipped == sum(k == "000000035" for s in range(12) for _, k in loader.keys(s, global_batch=True))


def test_manifest_does_not_match_files(shard_dir):
    _rewrite(shard_dir, "shard-train-00005.tar", [sample(i) for i in range(40, 47)])  # 7 samples, manifest says 8
    with pytest.raises(S.ShardError, match=r"shard shard-train-00005\.tar, sample key 000000046: manifest lists 8 samples but the file holds 7"):
        _read_all(shard_dir)
    _rewrite(shard_dir, "shard-train-00005.tar", [dict(sample(i), __key__=f"{i:09d}") for i in range(40, 48)])
    s = sample(41)
    del s["features"]
    _rewrite(shard_dir, "shard-train-00005.tar", [sample(40), s] + [sample(i) for i in range(42, 48)])
    with pytest.raises(S.ShardError, match=r"sample key 000000041: field 'features' is missing"):
        _read_all(shard_dir)

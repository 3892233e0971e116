"""``stage_a.online_encoder``: token-only shards + the frozen encoder run per batch give what stored
features give. Real text, the tiny random Qwen2 encoder, fp32 on CPU (``encoder.dtype: float32``,
so nothing is rounded away and the comparisons are tight): (1) the features Stage A computes for a
batch equal the shard features preprocess stored; (2) the first Stage A steps on 2 real gloo ranks
(torchrun, DeepSpeed ZeRO-2) log the same losses and export the same weights and encoder record;
(3) the pair store writes the same latents; and mismatched settings are refused naming the key."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import DEMO, demo_cfg, run_module, torchrun
from coupling_dist.data import shards as S

N = 96  # sentences: 91 train + 5 held-out
SHARDS = ["data.max_samples=96", "data.shard_size=48", "encoder.dtype=float32"]
FAST = ["run.wandb.mode=disabled", "run.progress=false", "run.log_interval=1", "stage_a.train.eval_interval=1000",
        "stage_a.train.warmup_steps=1", "stage_a.train.batch_size=8", "stage_a.train.steps=3",
        "stage_a.train.ckpt_interval=3", "encoder.dtype=float32"]
ONLINE = "stage_a.online_encoder=true"


class InProcessPool:
    """``components.ray_pool.ActorPool``'s interface, one worker in this process: the preprocess
    code runs as it is (its Ray pool is tested in test_preprocess), without a Ray start per set."""

    def __init__(self, cls, args, n, **_):
        self.worker = cls(*args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map_unordered(self, method, tasks, label=None):
        for t in tasks:
            yield t, getattr(self.worker, method)(t)


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """The same sentences preprocessed twice: stored features, and tokens only."""
    from coupling_dist.components import ray_launch, ray_pool
    from coupling_dist.stages.preprocess.work import preprocess

    root = tmp_path_factory.mktemp("online")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_pool, "ActorPool", InProcessPool)
        mp.setattr(ray_launch, "init_ray", lambda *a, **k: False)
        for name, extra in (("stored", []), ("online", [ONLINE])):
            preprocess(demo_cfg(root / name, *SHARDS, *extra))
    return {"root": root, "stored": str(root / "stored" / "data"), "online": str(root / "online" / "data")}


def _samples(data_dir: str) -> dict:
    return {s["__key__"]: s for split in ("train", "heldout")
            for batch in S.iter_shards(data_dir, split) for s in batch}


def test_online_features_equal_the_stored_ones(shard_sets):
    from coupling_dist.stages.stage_a.task import build_online_features

    stored, online = S.Manifest.load(shard_sets["stored"]), S.Manifest.load(shard_sets["online"])
    assert "features" in stored.fields and "features" not in online.fields
    assert online.to_dict()["online_features"] == stored.fields["features"]  # what Stage A will compute
    assert online.encoder == stored.encoder  # the same identity record: exports fit either set
    a, b = _samples(shard_sets["stored"]), _samples(shard_sets["online"])
    assert a.keys() == b.keys() and len(a) == N and all("features" not in s for s in b.values())
    enc = build_online_features(demo_cfg(shard_sets["root"], *SHARDS, ONLINE), torch.device("cpu"))
    keys = sorted(b)
    worst = 0.0
    for i in range(0, len(keys), 16):  # batches of 16, not preprocess's 64: batch-independent
        chunk = keys[i:i + 16]
        assert all((a[k]["tokens"] == b[k]["tokens"]).all() and (a[k]["mask"] == b[k]["mask"]).all() for k in chunk)
        got = enc(torch.from_numpy(np.stack([b[k]["tokens"] for k in chunk])))
        want = torch.from_numpy(np.stack([a[k]["features"] for k in chunk]))
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
        worst = max(worst, float((got - want).abs().max()))
    assert worst <= 1e-5, worst


def test_mismatched_online_settings_are_refused(shard_sets, tmp_path):
    from coupling_dist.components.preflight import PreflightError
    from coupling_dist.config import ConfigError
    from coupling_dist.stages.stage_a.preflight import preflight

    stored, online = f"data.out_dir={shard_sets['stored']}", f"data.out_dir={shard_sets['online']}"
    with pytest.raises(PreflightError, match=r"hold tokens only .*stage_a.online_encoder is false"):
        preflight(demo_cfg(tmp_path, online, "encoder.dtype=float32"))
    with pytest.raises(PreflightError, match=r"stage_a.online_encoder is true but these shards hold stored"):
        preflight(demo_cfg(tmp_path, stored, "encoder.dtype=float32", ONLINE))
    with pytest.raises(PreflightError, match=r"encoder.layer gives layer 1"):
        preflight(demo_cfg(tmp_path, online, "encoder.dtype=float32", "encoder.layer=1", ONLINE))
    with pytest.raises(PreflightError, match=r"encoder.dtype gives dtype 'float16'"):
        preflight(demo_cfg(tmp_path, online, ONLINE))
    with pytest.raises(ConfigError, match=r"'stage_a.online_encoder' is true but 'encoder.model' is null"):
        demo_cfg(tmp_path, "encoder.model=null", ONLINE)
    task = preflight(demo_cfg(tmp_path, online, "encoder.dtype=float32", ONLINE))
    assert task.online and task.feature_dim == 64
    # preprocess refuses to turn a stored-feature set into a token-only one in place
    from coupling_dist.stages.preprocess.work import preprocess

    with pytest.raises(PreflightError, match=r"differing: \['online_features'\]"):
        preprocess(demo_cfg(tmp_path, stored, *SHARDS, ONLINE))


def _stage_a(shard_sets, name: str, *extra) -> str:
    run = shard_sets["root"] / f"{name}_run"
    torchrun(2, ["-m", "coupling_dist.stage_a", "--config", DEMO, f"run.dir={run}",
                 f"data.out_dir={shard_sets[name]}", *FAST, *extra], timeout=900)
    return str(run)


def _losses(run: str) -> list[dict]:
    with open(os.path.join(run, "stage_a", "metrics.jsonl"), encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


@pytest.fixture(scope="module")
def stage_a_runs(shard_sets):
    return {"stored": _stage_a(shard_sets, "stored"), "online": _stage_a(shard_sets, "online", ONLINE)}


def test_first_stage_a_steps_are_the_same_both_ways(stage_a_runs):
    from coupling_dist.models.stage_a_export import load_stage_a

    a, b = _losses(stage_a_runs["stored"]), _losses(stage_a_runs["online"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "kl", "flow_nll"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (k, ra, rb)
    assert "mfu_encoder" in b[-1] and "mfu_encoder" not in a[-1]  # the encoder's forward is counted
    ma, ea = load_stage_a(os.path.join(stage_a_runs["stored"], "stage_a", "export"))
    mb, eb = load_stage_a(os.path.join(stage_a_runs["online"], "stage_a", "export"))
    assert eb["stage_a"]["online_encoder"] and not ea["stage_a"]["online_encoder"]
    for k in ("encoder", "feature_dim", "feature_dtype", "feature_stats", "tokenizer", "seq_len"):
        assert eb[k] == ea[k], k
    sa, sb = ma.state_dict(), mb.state_dict()
    assert max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa) <= 1e-5


def _latents(out_dir: str) -> dict:
    return {k: s["z"].astype(np.float64) for k, s in _samples(out_dir).items()}


def test_pair_store_latents_are_the_same_both_ways(shard_sets, stage_a_runs, tmp_path):
    from coupling_dist.stages.pair_store.preflight import prepare

    common = ["run.wandb.mode=disabled", "run.progress=false", "encoder.dtype=float32", "pair_store.batch_size=16",
              "pair_store.report_samples=64", "pair_store.dtype=float32"]
    for name, extra in (("stored", []), ("online", [ONLINE])):
        run_module("coupling_dist.pair_store", "--config", DEMO, f"run.dir={stage_a_runs[name]}",
                   f"data.out_dir={shard_sets[name]}", *common, *extra)
    za = _latents(os.path.join(stage_a_runs["stored"], "pair_store"))
    zb = _latents(os.path.join(stage_a_runs["online"], "pair_store"))
    assert za.keys() == zb.keys() and len(za) == N
    assert max(float(np.abs(za[k] - zb[k]).max()) for k in za) <= 1e-5
    man = S.Manifest.load(os.path.join(stage_a_runs["online"], "pair_store"))
    assert man.extra["settings"]["online_features"] is True
    # an export trained either way fits either shard set (the same encoder record)
    for art, data, extra in ((stage_a_runs["online"], shard_sets["stored"], []),
                             (stage_a_runs["stored"], shard_sets["online"], [ONLINE])):
        ctx = prepare(demo_cfg(tmp_path, f"data.out_dir={data}", "encoder.dtype=float32", *extra,
                               f"pair_store.artifact={os.path.join(art, 'stage_a', 'export')}"))
        assert ctx["online"] == bool(extra)


def test_provenance_records_the_online_encoder(tmp_path):
    from coupling_dist.components.provenance import config_record

    on, off = demo_cfg(tmp_path, ONLINE), demo_cfg(tmp_path)
    assert config_record(on, "preprocess")["stage_a.online_encoder"] is True
    assert config_record(off, "preprocess")["stage_a.online_encoder"] is False
    for stage in ("stage_a", "pair_store"):
        rec = config_record(on, stage)
        assert rec["encoder.model"] == "tiny:qwen2" and rec["encoder.layer"] == -1 and len(rec["encoder.identity"]) == 16
        assert "encoder.model" not in config_record(off, stage)  # stored features: the shard set covers it

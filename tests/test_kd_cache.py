"""The KD teacher's top-k cache (issue 13 §3): the pair-store writer stores it (the same bytes for 1
and 2 ranks) and records which teacher and temperature made it; Stage B refuses a cache made by
another teacher or temperature; a one-process Stage B run with ``stage_b.kd.source=cache``
completes. The loss itself is checked in tests/test_kd_loss.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import DEMO, demo_cfg, run_module, torchrun
from coupling_dist.components import assets
from coupling_dist.components.preflight import PreflightError
from coupling_dist.data import shards as S
from coupling_dist.components.assets import load_causal_lm
from coupling_dist.models.teacher import CACHE_FIELDS, trunk_hidden
from pair_store_fixtures import export_random_stage_a, make_source
from stage_b_fixtures import make_pair_store

TOPK, TEACHER, TEMP = 4, "tiny:qwen2", 2.0
FAST = ["run.progress=false", "run.wandb.mode=disabled", "run.log_interval=1", "stage_b.train.warmup_steps=1",
        "stage_b.train.eval_interval=1000", "stage_b.kd.chunk_vocab=151936"]


@pytest.fixture(scope="module")
def cache_world(tmp_path_factory):
    """Source shards tokenized as the teacher's tokenizer claims (KD needs the same tokenizer)."""
    root = tmp_path_factory.mktemp("kd_cache")
    data = str(root / "data")
    make_source(data, n_train=12, n_heldout=4, shard_size=4, T=12, H=16, V=64,
                tokenizer=assets.tokenizer_identity(TEACHER))
    return {"root": root, "data": data, "art": export_random_stage_a(str(root / "stage_a"), data)}


def _ps_args(w, run_dir, *extra):
    return ["--config", DEMO, f"run.dir={run_dir}", f"data.out_dir={w['data']}", f"pair_store.artifact={w['art']}",
            f"pair_store.teacher_topk={TOPK}", f"stage_b.kd.teacher={TEACHER}", f"stage_b.kd.temperature={TEMP}",
            "pair_store.batch_size=3", "pair_store.report_samples=16", "run.wandb.mode=disabled", "run.progress=false",
            *extra]


def _samples(out_dir):
    out = {}
    for s in S.Manifest.load(out_dir).shards:
        for smp in S.read_shard(os.path.join(out_dir, s["name"])):
            out[smp["__key__"]] = smp
    return out


def test_writer_stores_the_cache_and_records_the_teacher(cache_world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_module("coupling_dist.pair_store", *_ps_args(cache_world, one), timeout=600)
    torchrun(2, ["-m", "coupling_dist.pair_store", *_ps_args(cache_world, two)], timeout=600)
    a, b = str(one / "pair_store"), str(two / "pair_store")
    man = json.load(open(os.path.join(a, "manifest.json")))
    T = man["seq_len"]
    assert man["fields"]["teacher_ids"] == {"dtype": "int32", "shape": [T, TOPK]}
    assert man["fields"]["teacher_logp"] == {"dtype": "float32", "shape": [T, TOPK]}
    assert man["fields"]["teacher_tail"] == {"dtype": "float32", "shape": [T]}
    rec = man["teacher_cache"]
    assert rec["teacher"] == {"name": TEACHER, "hash": assets.identity(TEACHER)["hash"]}
    assert rec["temperature"] == TEMP and rec["topk"] == TOPK
    # the same bytes whatever the rank count
    sa, sb = S.Manifest.load(a).shards, S.Manifest.load(b).shards
    assert [(s["name"], s["sha256"]) for s in sa] == [(s["name"], s["sha256"]) for s in sb]
    # the stored values are the teacher's top-k log-probabilities at the temperature, and the tail
    teacher = load_causal_lm(assets.resolve(TEACHER), torch.device("cpu"))
    smp = next(iter(_samples(a).values()))
    tok, mask = torch.from_numpy(smp["tokens"].astype(np.int64))[None], torch.from_numpy(smp["mask"])[None]
    with torch.no_grad():
        logits = trunk_hidden(teacher, tok, mask) @ teacher.get_output_embeddings().weight.t()
    logp = torch.log_softmax(logits[0] / TEMP, -1)
    ref_vals, ref_ids = logp.topk(TOPK, -1)
    assert smp["teacher_ids"].dtype == np.int32 and np.array_equal(smp["teacher_ids"], ref_ids.numpy())
    np.testing.assert_allclose(smp["teacher_logp"], ref_vals.numpy(), atol=1e-5)
    tail = torch.log1p(-ref_vals.exp().sum(-1))
    np.testing.assert_allclose(smp["teacher_tail"], tail.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def cached_store(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("cached_store"))
    make_pair_store(base, n_train=16, n_heldout=4, teacher_topk=TOPK, teacher=TEACHER, temperature=TEMP)
    return base


def _run(tmp_path, store) -> str:
    os.symlink(os.path.join(store, "pair_store"), tmp_path / "pair_store")
    return str(tmp_path)


def test_preflight_refuses_another_teacher_or_temperature(tmp_path, cached_store):
    from coupling_dist.stages.stage_b.preflight import checked_task_info

    run = _run(tmp_path, cached_store)
    info = checked_task_info(demo_cfg(run, "stage_b.kd.source=cache"), 1)
    assert info["teacher"]["source"] == "cache"
    with pytest.raises(PreflightError, match=r"stage_b\.kd\.temperature: cache made at 2\.0 but the config says 1\.5"):
        checked_task_info(demo_cfg(run, "stage_b.kd.source=cache", "stage_b.kd.temperature=1.5"), 1)
    other = tmp_path / "other_teacher"  # the same tokenizer and vocabulary, another model config
    load_causal_lm(assets.resolve(TEACHER), torch.device("cpu")).save_pretrained(str(other))
    conf = json.load(open(other / "config.json"))
    conf["rms_norm_eps"] = 1e-5 if conf.get("rms_norm_eps") != 1e-5 else 1e-6
    json.dump(conf, open(other / "config.json", "w"))
    assets.load_tokenizer(TEACHER).save_pretrained(str(other))
    with pytest.raises(PreflightError, match=r"stage_b\.kd\.teacher: cache made by .*tiny:qwen2"):
        checked_task_info(demo_cfg(run, "stage_b.kd.source=cache", f"stage_b.kd.teacher={other}"), 1)
    checked_task_info(demo_cfg(run, f"stage_b.kd.teacher={other}"), 1)  # live KD does not read the cache
    plain = tmp_path / "plain"
    os.makedirs(plain)
    make_pair_store(str(plain), n_train=8, n_heldout=0)
    with pytest.raises(PreflightError, match="holds no KD teacher cache"):
        checked_task_info(demo_cfg(str(plain), "stage_b.kd.source=cache"), 1)


def test_stage_b_trains_from_the_cache(tmp_path, cached_store):
    run = _run(tmp_path, cached_store)
    run_module("coupling_dist.stage_b", "--config", DEMO, f"run.dir={run}", "stage_b.kd.source=cache",
               "stage_b.train.steps=2", "stage_b.train.batch_size=4", *FAST, timeout=600)
    done = json.load(open(os.path.join(run, "stage_b", "_COMPLETE.json")))
    rows = [json.loads(x) for x in open(os.path.join(run, "stage_b", "metrics.jsonl")) if '"loss"' in x]
    assert rows[-1]["step"] == 2 and rows[-1]["kd"] > 0 and "mfu_teacher" not in rows[-1], rows
    assert done["summary"] is not None
    assert set(CACHE_FIELDS) <= set(json.load(open(os.path.join(run, "pair_store", "manifest.json")))["fields"])

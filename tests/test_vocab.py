"""The compact vocabulary (``data.vocab: corpus``, ``coupling_dist/data/vocab.py``): the id list and its
cache, the maps and their refusals, Stage A training and export on it, KD against the restricted
and renormalised teacher, samplers that return tokenizer ids, and a Stage B entry run."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO, demo_cfg, run_module
from pair_store_fixtures import make_source, synthetic_tokenizer
from stage_b_fixtures import make_pair_store

from coupling_dist.config import GeneratorConfig
from coupling_dist.data import shards as S
from coupling_dist.data.vocab import VOCAB_FILE, CompactVocab, build_vocab
from coupling_dist.losses.kd_loss import sequence_loss
from coupling_dist.models.generator import Generator, export_generator
from coupling_dist.sampling.generate import load_export
from coupling_dist.sampling.onestep import SampleSettings
from coupling_dist.sampling.p2_self import sample_any

V_FULL = 500  # the synthetic tokenizer; the source shards use ids < 40 plus EOS/pad (499)


@pytest.fixture()
def data_dir(tmp_path):
    d = str(tmp_path / "data")
    make_source(d, n_train=32, n_heldout=8, T=12, H=16, V=40, tokenizer=synthetic_tokenizer(V_FULL))
    return d


def _shard_ids(data_dir) -> set:
    man = S.Manifest.load(data_dir)
    return {int(t) for s in man.shards for smp in S.read_shard(os.path.join(data_dir, s["name"]), ["tokens"])
            for t in smp["tokens"]}


def test_build_covers_every_split_and_maps_round_trip(data_dir):
    vocab = build_vocab(data_dir)
    assert set(vocab.ids) == _shard_ids(data_dir) | {V_FULL - 1} and vocab.ids == sorted(vocab.ids)
    assert vocab.full_size == V_FULL and vocab.size < 41
    full = torch.tensor(vocab.ids).view(2, -1) if vocab.size % 2 == 0 else torch.tensor(vocab.ids)
    assert torch.equal(vocab.to_full(vocab.to_compact(full)), full)
    assert torch.equal(vocab.to_compact(torch.tensor(vocab.ids)), torch.arange(vocab.size))
    w = torch.randn(V_FULL, 3)
    r = vocab.restrict(w, rows=vocab.size + 5)
    assert torch.equal(r[:vocab.size], w[vocab.ids]) and not r[vocab.size:].any()


def test_unknown_id_is_refused_naming_it(data_dir):
    vocab = build_vocab(data_dir)
    missing = next(i for i in range(V_FULL) if i not in vocab.ids)
    with pytest.raises(ValueError, match=f"token id {missing} is not in the compact vocabulary"):
        vocab.to_compact(torch.tensor([vocab.ids[0], missing]))
    with pytest.raises(ValueError, match="out of range"):
        vocab.to_full(torch.tensor([vocab.size]))


def test_cache_is_reused_and_rebuilt_for_another_shard_set(data_dir):
    first = build_vocab(data_dir)
    cache = os.path.join(data_dir, VOCAB_FILE)
    with open(cache) as fh:
        stored = json.load(fh)
    assert stored["ids"] == first.ids and stored["shard_set"]
    stored["ids"] = [0, 1]  # a tampered list with the right identity is what the cache returns
    with open(cache, "w") as fh:
        json.dump(stored, fh)
    assert build_vocab(data_dir).ids == [0, 1]
    # the same directory rewritten with other shards (another seed): the stale list is rebuilt
    make_source(data_dir, n_train=32, n_heldout=8, T=12, H=16, V=60, seed=1, tokenizer=synthetic_tokenizer(V_FULL))
    assert set(build_vocab(data_dir).ids) == _shard_ids(data_dir) | {V_FULL - 1}


def test_kd_on_compact_head_is_kl_of_restricted_renormalised_teacher():
    """KD with the teacher's head rows for the compact ids (zero-padded, like the task) equals a
    direct KL(softmax over the compact ids of the full teacher logits || student softmax)."""
    torch.manual_seed(0)
    B, T, H, Ht, V_full, tau = 2, 5, 8, 6, 50, 2.0
    vocab = CompactVocab([3, 7, 8, 20, 31, 49], V_full)
    rows = 8  # head padded beyond the compact size (TP divisibility)
    h, w = torch.randn(B, T, H), torch.randn(rows, H)
    th, wt_full = torch.randn(B, T, Ht), torch.randn(V_full, Ht)
    tokens = vocab.to_compact(torch.tensor(vocab.ids)[torch.randint(0, vocab.size, (B, T))])
    mask = torch.ones(B, T, dtype=torch.bool)
    for chunk_vocab in (rows, 3):  # one chunk, and chunks of which one holds padding rows only
        _, _, kd = sequence_loss(h, tokens, mask, w, teacher_hidden=th, teacher_weight=vocab.restrict(wt_full, rows),
                                 kd_mask=mask, temperature=tau, teacher_vocab=vocab.size, chunk_rows=4,
                                 chunk_vocab=chunk_vocab)
        log_p = F.log_softmax((th @ wt_full.t())[..., vocab.ids] / tau, -1)[:, :-1]  # teacher t-1 predicts t
        log_q = F.log_softmax((h @ w.t()) / tau, -1)[:, 1:, :vocab.size]
        direct = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * tau * tau
        assert torch.allclose(kd, direct, atol=1e-5), (chunk_vocab, float(kd), float(direct))


def test_stage_a_compact_loss_is_full_loss_with_other_ids_excluded():
    """The compact head = the full head's rows for the compact ids: its loss equals the full-vocab
    loss once every other id's logit is pushed to -inf (here: a -1e4 bias)."""
    from coupling_dist.models.stage_a import StageAModel
    from pair_store_fixtures import tiny_stage_a_cfg

    vocab = CompactVocab([2, 9, 10, 33, 60, 99], 100)
    torch.manual_seed(0)
    full = StageAModel(16, 100, tiny_stage_a_cfg())
    compact = StageAModel(16, vocab.size, tiny_stage_a_cfg())
    sd = full.state_dict()
    compact.load_state_dict(dict(sd, **{"head.weight": vocab.restrict(sd["head.weight"]),
                                        "head.bias": sd["head.bias"][vocab.ids]}))
    with torch.no_grad():
        outside = torch.ones(100, dtype=torch.bool)
        outside[vocab.ids] = False
        full.head.bias[outside] = -1e4
    feats, tokens = torch.randn(3, 7, 16), torch.tensor(vocab.ids)[torch.randint(0, vocab.size, (3, 7))]
    mask, eps = torch.ones(3, 7, dtype=torch.bool), torch.randn(3, 7, 8)
    lf, mf = full.loss(feats, tokens, mask, eps=eps)
    lc, mc = compact.loss(feats, vocab.to_compact(tokens), mask, eps=eps)
    assert torch.allclose(lf, lc, atol=1e-5) and torch.allclose(mf["rec_acc"], mc["rec_acc"])


def test_stage_a_trains_on_compact_vocab_and_export_maps_back(tmp_path):
    """Shards tokenized (nominally) with Qwen: ids < 40 plus Qwen's EOS/pad 151643."""
    from coupling_dist.components import assets
    from coupling_dist.data.loader import ShardLoader
    from coupling_dist.models.stage_a_export import export_stage_a
    from coupling_dist.stages.stage_a.task import StageATask

    data_dir = str(tmp_path / "data")
    make_source(data_dir, n_train=32, n_heldout=8, T=12, H=16, V=40,
                tokenizer=assets.tokenizer_identity("asset:qwen2.5-tokenizer"))
    cfg = demo_cfg(tmp_path, f"data.out_dir={data_dir}", "data.vocab=corpus", "stage_a.latent_dim=8",
                   "stage_a.decoder.width=32", "stage_a.flow.hidden=32", "stage_a.train.steps=30")
    task = StageATask.from_data(cfg, data_dir)
    assert task.vocab is not None and task.vocab_size == task.vocab.size
    torch.manual_seed(0)
    model = task.build_model()
    assert model.head.out_features == task.vocab.size
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = list(ShardLoader(data_dir, "train", 16, 0, 0, 1, fields=["features", "tokens", "mask"]))
    first = last = None
    for step in range(30):
        loss, m = task.loss(model, batches[step % len(batches)], step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(m["ce"])
        last = m
    assert float(last["ce"]) < first - 1.0 and float(last["rec_acc"]) > 0.6, (first, last)
    art = str(tmp_path / "stage_a_export")
    export_stage_a(model, art, dict(task.meta, train_step=30))
    sampler, meta = load_export(art, kind="stage_a")
    ids = sample_any(sampler, meta, range(6), SampleSettings(temperature=1.0, top_p=1.0), vocab_limit=151665)
    assert ids.shape == (6, 12) and set(ids.flatten().tolist()) <= set(task.vocab.ids)
    assert ids.max() == 151643  # tokenizer ids (EOS/pad), not head rows


@pytest.mark.parametrize("kind", ["onestep", "masked"])
def test_sampling_a_compact_generator_export_returns_tokenizer_ids(tmp_path, kind):
    vocab = CompactVocab([5, 17, 90, 91, 400, 499], V_FULL)
    masked = kind == "masked"
    cfg = GeneratorConfig(kind=kind, width=16, depth=1, heads=2, ffn=32)
    rows = 16  # padded head; the mask token sits right after the compact ids
    gen = Generator(cfg, 4, 6, rows, vocab.size if masked else None)
    # 10 of the 16 random head rows are padding (one the mask token): unbanned, they would be drawn
    meta = {"latent_dim": 4, "seq_len": 6, "vocab_size": rows, "eos_id": 499, "pad_id": 499, "kind": kind,
            "mask_token_id": vocab.size if masked else None, "vocab": vocab.to_meta()}
    out = str(tmp_path / "export")
    export_generator(gen, cfg, meta, out)
    model, meta = load_export(out)
    settings = SampleSettings(temperature=1.0, top_p=1.0, steps=2 if masked else 1)
    ids = sample_any(model, meta, range(8), settings, vocab_limit=V_FULL)
    assert set(ids.flatten().tolist()) <= set(vocab.ids)


@pytest.mark.slow
def test_stage_b_entry_runs_and_exports_with_compact_vocab(tmp_path):
    make_pair_store(str(tmp_path), n_train=32, n_heldout=8)
    run_module("coupling_dist.stage_b", "--config", DEMO, f"run.dir={tmp_path}", "data.vocab=corpus",
               "stage_b.train.steps=4", "stage_b.train.batch_size=8", "run.progress=false", "run.wandb.mode=disabled",
               "stage_b.train.eval_interval=1000", "stage_b.train.warmup_steps=1", timeout=900)
    vocab = build_vocab(os.path.join(tmp_path, "pair_store"))
    from coupling_dist.models.generator import load_generator

    model, meta = load_generator(os.path.join(tmp_path, "stage_b", "export"))
    assert meta["vocab"]["ids"] == vocab.ids and meta["vocab_size"] == 1024 * -(-vocab.size // 1024)
    with open(os.path.join(tmp_path, "stage_b", "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if '"kd"' in line]
    assert rows and rows[-1]["kd"] > 0
    ids = sample_any(model, meta, range(4), SampleSettings(), vocab_limit=151665)
    assert set(ids.flatten().tolist()) <= set(vocab.ids)


def test_stage_b_preflight_sizes_the_compact_head(tmp_path):
    """Masked denoiser + KD teacher on the pair-store fixture: the head covers the compact ids plus
    the mask token (right after them), padded to 1024; the full vocabulary stays the teacher's."""
    from coupling_dist.stages.stage_b.preflight import preflight

    make_pair_store(str(tmp_path), n_train=16, n_heldout=4)
    base = ["stage_b.model.kind=masked"]
    full = preflight(demo_cfg(tmp_path, *base))
    assert full["vocab"] is None and full["vocab_size"] == 151936 and full["mask_token_id"] == 151935
    info = preflight(demo_cfg(tmp_path, *base, "data.vocab=corpus"))
    vocab = info["vocab"]
    assert vocab.ids == build_vocab(os.path.join(tmp_path, "pair_store")).ids and 151643 in vocab.ids
    assert info["mask_token_id"] == vocab.size and info["vocab_size"] == 1024 * -(-(vocab.size + 1) // 1024)

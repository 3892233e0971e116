"""Sampling: top-p vs the full-sort reference, reproducibility, P2-self vs a direct transcription,
K = 1 vs one-step decoding, multi-rank merged output (real torchrun processes)."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ROOT, torchrun  # noqa: E402
from toy_generators import MaskedToy, OneStepToy, masked_meta, onestep_meta  # noqa: E402

from coupling_dist.sampling.onestep import (SampleSettings, draw_latents, sample_generator,  # noqa: E402
                                            sample_onestep)
from coupling_dist.sampling.p2_self import kappa, sample_p2_self  # noqa: E402
from coupling_dist.sampling.top_p import (apply_temperature, sample_top_p, top_p_mask,  # noqa: E402
                                         top_p_mask_reference)

QWEN_V = 151936


# --------------------------------------------------------------------------- top-p


@pytest.mark.parametrize("scale,p", [(1.0, 0.95), (4.0, 0.95), (10.0, 0.9), (30.0, 0.5), (2.0, 0.999)])
def test_top_p_equals_full_sort_reference(scale, p):
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(24, QWEN_V, generator=g) * scale
    logits[:3, -300:] = float("-inf")  # banned ids
    fast, ref = top_p_mask(logits, p), top_p_mask_reference(logits, p)
    assert torch.equal(fast, ref)
    assert (ref.sum(1) >= 1).all()


def test_top_p_ties_and_small_k():
    # Equal values straddling the top-k boundary must fall back and keep every tied token.
    logits = torch.full((4, 5000), -20.0)
    logits[:, :10] = 5.0  # 10 tied leaders
    logits[1, :3] = 9.0
    logits[2] = torch.linspace(3, -3, 5000)
    for k in (4, 9, 10, 11, 64):
        assert torch.equal(top_p_mask(logits, 0.9, k=k), top_p_mask_reference(logits, 0.9))
    assert top_p_mask(logits, 0.9, k=4)[0, :10].all()  # all tied leaders kept
    assert top_p_mask(torch.randn(3, 50), 1.0).all()
    # a vocabulary no larger than k (compact heads): whole-row sort path, ties and tiny p included
    small = torch.randn(64, 50, generator=torch.Generator().manual_seed(3)) * 3
    small[:4, :6] = 8.0
    for p in (1e-6, 0.5, 0.9, 0.999):
        assert torch.equal(top_p_mask(small, p, k=64), top_p_mask_reference(small, p)), p


def test_top_p_nucleus_definition_small():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lg = probs.log()
    assert top_p_mask_reference(lg, 0.5).tolist() == [[True, False, False, False]]  # smallest set reaching p
    assert top_p_mask_reference(lg, 0.78).tolist() == [[True, True, False, False]]
    assert top_p_mask_reference(lg, 0.82).tolist() == [[True, True, True, False]]
    assert top_p_mask(lg, 0.82, k=2).tolist() == [[True, True, True, False]]  # fallback path
    assert top_p_mask(lg, 0.78, k=2).tolist() == [[True, True, False, False]]  # fast path


def test_sample_top_p_stays_in_nucleus_and_matches_law():
    g = torch.Generator().manual_seed(1)
    V = 40
    row = torch.randn(V, generator=g) * 2
    n = 40000
    logits = row.expand(n, V)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    tok = sample_top_p(logits, u, 0.8, k=8)
    keep = top_p_mask_reference(row[None], 0.8)[0]
    assert keep[tok].all()
    q = torch.softmax(row.double(), 0) * keep
    q = q / q.sum()
    freq = torch.bincount(tok, minlength=V).double() / n
    assert (freq - q).abs().max() < 0.015  # ~4 sigma for the largest kept probability
    # k larger than V, and top_p = 1 (no filtering), follow the same law.
    full = sample_top_p(logits, u, 1.0)
    freq1 = torch.bincount(full, minlength=V).double() / n
    assert (freq1 - torch.softmax(row.double(), 0)).abs().max() < 0.015


# --------------------------------------------------------------------------- one-step


def _toy_onestep(V=300, T=10, d=6, eos=7):
    return OneStepToy(V, T, d, eos_id=eos), onestep_meta(V, T, d, eos)


def test_onestep_reproducible_and_batch_size_independent():
    model, meta = _toy_onestep()
    s = SampleSettings(temperature=0.7, top_p=0.9, latent_scale=0.85, seed=11)
    a = sample_onestep(model, meta, range(23), s, batch_size=23)
    b = sample_onestep(model, meta, range(23), s, batch_size=4)
    c = sample_onestep(model, meta, range(23), s, batch_size=1)
    assert torch.equal(a, b) and torch.equal(a, c)
    # A block of indices (what one rank draws) equals the same rows of the whole set.
    assert torch.equal(sample_onestep(model, meta, range(9, 17), s, batch_size=3), a[9:17])
    other = sample_onestep(model, meta, range(23), SampleSettings(temperature=0.7, top_p=0.9, seed=12), batch_size=5)
    assert not torch.equal(a, other)
    assert len({tuple(r) for r in a.tolist()}) > 15  # samples differ from each other


def test_latent_scale_and_per_position_temperature():
    gens = [sample_generator(0, i) for i in range(64)]
    z = draw_latents(gens, 16, 32, 0.8)
    assert abs(z.std().item() - 0.8) < 0.02 and abs(z.mean().item()) < 0.02
    model, meta = _toy_onestep(T=10)
    # Temperature -> 0 at a position makes it (near) greedy there; a list gives one value per position.
    temps = [1e-4] * 5 + [1.0] * 5
    s = SampleSettings(temperature=temps, top_p=1.0, seed=0)
    ids = sample_onestep(model, meta, range(30), s, batch_size=8)
    gz = torch.stack([draw_latents([sample_generator(0, i)], 10, 6, s.latent_scale)[0] for i in range(30)])
    greedy = model(gz).argmax(-1)
    assert torch.equal(ids[:, :5], greedy[:, :5])
    assert not torch.equal(ids[:, 5:], greedy[:, 5:])
    with pytest.raises(ValueError):
        sample_onestep(model, meta, range(2), SampleSettings(temperature=[1.0, 1.0]))


# --------------------------------------------------------------------------- P2-self


def _transcribe_p2(model, meta, indices, s: SampleSettings):
    """Algorithm 3 of the paper written out one sample and one position at a time (plain Python
    lists and loops), drawing the same random numbers in the same order as the sampler: per
    sample, z first, then one [T, V] block of float64 uniforms per step for the Gumbel noise."""
    T, d, mask, V = meta["seq_len"], meta["latent_dim"], meta["mask_token_id"], meta["vocab_size"]
    K = s.steps
    gens = [sample_generator(s.seed, i) for i in indices]
    z = draw_latents(gens, T, d, s.latent_scale)
    x = [[mask] * T for _ in indices]
    events = []
    x_hat = None
    for i in range(1, K + 1):
        unif = [torch.rand(T, V, generator=g, dtype=torch.float64) for g in gens]
        logits = model(z, torch.tensor(x)).double()
        step = {"revealed": [], "remasked": [], "masked_after": []}
        x_hat = []
        for b in range(len(indices)):
            scores, props = [], []
            for j in range(T):  # every position is non-fixed here (f_j = 0)
                pert = []
                for v in range(V):
                    u = min(max(float(unif[b][j, v]), torch.finfo(torch.float64).tiny), 1.0 - 2 ** -53)
                    g = -math.log(-math.log(u))
                    pert.append(float("-inf") if v == mask else float(logits[b, j, v]) / s.temperature + g)
                best = max(range(V), key=lambda v: (pert[v], -v))
                top = max(pert)
                lse = top + math.log(sum(math.exp(p - top) for p in pert if p != float("-inf")))
                sc = pert[best] - lse
                if x[b][j] != mask:  # previously generated: U^(i)
                    sc *= s.eta
                props.append(best)
                scores.append(sc)
            n_mask = math.floor(T * (1 - kappa(s.kappa, i / K)))
            remain = sorted(range(T), key=lambda j: (scores[j], j))[:n_mask]
            new = list(x[b])
            for j in remain:
                new[j] = mask
            for j in range(T):
                if x[b][j] == mask and j not in remain:
                    new[j] = props[j]
            step["revealed"].append(sorted(j for j in range(T) if x[b][j] == mask and new[j] != mask))
            step["remasked"].append(sorted(j for j in range(T) if x[b][j] != mask and new[j] == mask))
            step["masked_after"].append(sorted(remain))
            x[b] = new
            x_hat.append(props)
        events.append(step)
    for b in range(len(indices)):  # line 24: fill what is still masked with the last proposal
        x[b] = [x_hat[b][j] if x[b][j] == mask else x[b][j] for j in range(T)]
    return torch.tensor(x), events


@pytest.mark.parametrize("steps,eta,kap,tau", [(4, 2.0, "cosine", 2.0), (6, 1.0, "linear", 0.9),
                                               (3, 0.0, "linear", 0.9)])
def test_p2_self_matches_algorithm_3(steps, eta, kap, tau):
    V, T, d, mask = 24, 10, 4, 23
    model = MaskedToy(V, T, d, mask)
    meta = masked_meta(V, T, d, 0, mask)
    s = SampleSettings(temperature=tau, latent_scale=0.85, steps=steps, eta=eta, kappa=kap, seed=5)
    trace: list = []
    with torch.no_grad():
        ids = sample_p2_self(model, meta, range(6), s, batch_size=6, trace=trace)
        ref, events = _transcribe_p2(model, meta, range(6), s)
    assert torch.equal(ids, ref)
    assert (ids != mask).all()
    remasked = 0
    for step, ev in zip(trace, events):
        for b in range(6):
            before, after = step["masked_before"][b], step["masked_after"][b]
            assert sorted(after.nonzero().flatten().tolist()) == ev["masked_after"][b]
            assert sorted((before & ~after).nonzero().flatten().tolist()) == ev["revealed"][b]
            assert sorted((~before & after).nonzero().flatten().tolist()) == ev["remasked"][b]
            remasked += len(ev["remasked"][b])
            assert int(after.sum()) == math.floor(T * (1 - kappa(kap, step["step"] / steps)))
    if eta > 0:
        assert remasked > 0, remasked  # low-confidence revealed positions really get remasked
    else:
        assert remasked == 0  # eta = 0: revealed positions score 0, above any masked proposal


def test_p2_self_defaults_follow_algorithm_3():
    s = SampleSettings()
    assert s.kappa == "linear" and s.proposal_top_p == 1.0


def test_p2_self_k1_draws_from_the_tempered_softmax():
    """K = 1 is one-step decoding of H(z, all-mask): the Gumbel-max proposal at a position is a draw
    from softmax(l / tau). Fixed z (latent_scale ~ 0), many seeds: empirical vs exact frequencies."""
    V, T, d, mask = 6, 3, 2, 5
    model = MaskedToy(V, T, d, mask, seed=3)
    meta = masked_meta(V, T, d, 0, mask)
    n = 4000
    s = SampleSettings(temperature=0.8, steps=1, latent_scale=1e-9, seed=2)
    with torch.no_grad():
        ids = sample_p2_self(model, meta, range(n), s, batch_size=1000)
        z0 = torch.zeros(1, T, d)
        p = torch.softmax(apply_temperature(model(z0, torch.full((1, T), mask)), 0.8,
                                            torch.tensor([mask]))[0], -1)
    assert not (ids == mask).any()
    freq = torch.stack([torch.bincount(ids[:, t], minlength=V).double() / n for t in range(T)])
    assert (freq - p.double()).abs().max() < 0.035  # ~4.5 standard errors at n = 4000


def test_p2_self_batch_size_independent():
    V, T, d, mask = 30, 8, 4, 29
    model = MaskedToy(V, T, d, mask, seed=1)
    meta = masked_meta(V, T, d, 0, mask)
    s = SampleSettings(temperature=1.0, top_p=0.95, steps=4, seed=9)
    with torch.no_grad():
        assert torch.equal(sample_p2_self(model, meta, range(10), s, batch_size=10),
                           sample_p2_self(model, meta, range(10), s, batch_size=3))


# --------------------------------------------------------------------------- entry-level: records, ranks


def test_records_stop_at_first_eos_and_multirank_merge(tmp_path):
    from coupling_dist.components.assets import load_tokenizer

    from sample_worker import QWEN_EOS

    # Both runs in their own processes: torch.distributed set-up mutates the environment.
    single = str(tmp_path / "one" / "samples.jsonl")
    torchrun(1, [os.path.join(ROOT, "tests", "sample_worker.py"), single, "10", "4"], timeout=300)
    multi = str(tmp_path / "two" / "samples.jsonl")
    torchrun(2, [os.path.join(ROOT, "tests", "sample_worker.py"), multi, "10", "3"], timeout=300)
    one = open(single, encoding="utf-8").read().splitlines()
    two = open(multi, encoding="utf-8").read().splitlines()
    assert one == two and len(one) == 10
    assert not [f for f in os.listdir(tmp_path / "two") if f != "samples.jsonl"]  # parts/temp files removed
    tok = load_tokenizer("asset:qwen2.5-tokenizer")
    recs = [json.loads(line) for line in one]
    assert [r["index"] for r in recs] == list(range(10))
    assert any(r["eos"] for r in recs) and any(len(r["ids"]) > 0 for r in recs)
    for r in recs:
        assert QWEN_EOS not in r["ids"] and all(i < len(tok) for i in r["ids"])
        assert r["text"] == tok.decode(r["ids"])
        assert r["settings"]["temperature"] == 0.7


# --------------------------------------------------------------------------- the real exported generator


def _export(tmp_path, kind):
    from coupling_dist.models.generator import Generator, export_generator

    arch = {"kind": kind, "width": 32, "depth": 1, "heads": 2, "ffn": 64, "norm": "rmsnorm", "act": "swiglu",
            "attention": "auto"}
    mask = QWEN_V - 1 if kind == "masked" else None
    torch.manual_seed(0)
    model = Generator(arch, 8, 12, QWEN_V, mask)
    meta = {"latent_dim": 8, "seq_len": 12, "vocab_size": QWEN_V, "tokenizer": "asset:qwen2.5-tokenizer",
            "eos_id": 151643, "pad_id": 151643, "mask_token_id": mask}
    return export_generator(model, arch, meta, str(tmp_path / f"export_{kind}"))


def test_sample_entry_with_real_export(tmp_path):
    from conftest import DEMO, run_module

    export = _export(tmp_path, "onestep")
    out = tmp_path / "s.jsonl"
    run_module("coupling_dist.sample", "--config", DEMO, f"run.dir={tmp_path}", "run.wandb.mode=disabled",
               "run.progress=false", f"sample.export={export}", f"sample.out={out}", "sample.num_samples=5",
               "sample.batch_size=2", timeout=300)
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in recs] == list(range(5))
    assert all(i < 151669 for r in recs for i in r["ids"])  # padded model-vocab rows are never sampled
    bad = run_module("coupling_dist.sample", "--config", DEMO, f"run.dir={tmp_path}", "run.wandb.mode=disabled",
                     f"sample.export={export}", "sample.steps=3", check=False, timeout=300)
    assert bad.returncode != 0 and "masked denoiser" in bad.stderr


def test_p2_self_on_real_masked_export(tmp_path):
    from coupling_dist.sampling.generate import load_export

    model, meta = load_export(_export(tmp_path, "masked"))
    s = SampleSettings(temperature=1.0, steps=3, seed=1)
    trace: list = []
    ids = sample_p2_self(model, meta, range(4), s, batch_size=4, vocab_limit=151669, trace=trace)
    assert ids.shape == (4, 12) and not (ids == meta["mask_token_id"]).any()
    assert (ids < 151669).all()  # padded model-vocab rows are banned from the proposals
    assert [int(t["masked_after"].sum()) for t in trace] == [4 * math.floor(12 * (1 - kappa(s.kappa, i / 3)))
                                                             for i in (1, 2, 3)]
    nucleus = SampleSettings(temperature=1.0, steps=3, seed=1, proposal_top_p=0.5)
    assert not torch.equal(sample_p2_self(model, meta, range(4), nucleus, vocab_limit=151669), ids)


def test_stage_a_only_sampler_from_the_stage_a_export(tmp_path):
    """sample.kind=stage_a: z -> inverse flow -> Stage A decoder, loaded from the Stage A export and
    sampled by the one-step path (records and all)."""
    from coupling_dist.components import assets
    from coupling_dist.config import DecoderConfig, FlowConfig, StageAConfig
    from coupling_dist.models.stage_a import StageAModel
    from coupling_dist.models.stage_a_export import export_stage_a
    from coupling_dist.sampling.generate import generate_records, load_export

    torch.manual_seed(0)
    V = 151936
    cfg = StageAConfig(latent_dim=4, flow=FlowConfig(layers=2, hidden=16, heads=2),
                       decoder=DecoderConfig(width=16, depth=1, heads=2, ffn=32))
    stage_a = StageAModel(8, V, cfg).eval()
    for p in stage_a.flow.parameters():  # a non-identity flow, so the inverse matters
        torch.nn.init.normal_(p, std=0.05)
    tok_ident = assets.tokenizer_identity("asset:qwen2.5-tokenizer")
    out = export_stage_a(stage_a, str(tmp_path / "stage_a" / "export"), {"seq_len": 6, "tokenizer": tok_ident})
    model, meta = load_export(out, kind="stage_a")
    assert meta["kind"] == "stage_a" and meta["eos_id"] == 151643 and meta["latent_dim"] == 4
    z = torch.randn(3, 6, 4)
    with torch.no_grad():
        want = stage_a.decode(stage_a.from_gaussian(z))
        torch.testing.assert_close(model(z), want, rtol=1e-5, atol=1e-5)
    tok = assets.load_tokenizer("asset:qwen2.5-tokenizer")
    s = SampleSettings(temperature=0.7, top_p=0.95, seed=3)
    recs = generate_records(model, meta, tok, range(4), s, batch_size=2)
    assert [r["index"] for r in recs] == list(range(4)) and all(len(r["all_ids"]) == 6 for r in recs)
    assert recs == generate_records(model, meta, tok, range(4), s, batch_size=4)  # a function of (seed, index)

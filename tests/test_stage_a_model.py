"""Stage A model (no Trainer): loss terms, pads, training signal, export/load round trip."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from coupling_dist.config import DecoderConfig, FlowConfig, StageAConfig, TrainConfig
from coupling_dist.models.stage_a import StageAModel
from coupling_dist.models.stage_a_export import artifact_hash, export_stage_a, load_stage_a

H, V, T, D = 12, 50, 8, 6


def tiny_cfg(kind: str = "realnvp", **kw) -> StageAConfig:
    """``kind`` "realnvp_mlp": RealNVP with the MLP conditioner over the T x D block."""
    flow = (FlowConfig(kind="realnvp", conditioner="mlp", positions=T, layers=2, hidden=16, depth=2)
            if kind == "realnvp_mlp" else FlowConfig(kind=kind, layers=2, hidden=16, depth=1, heads=2))
    return StageAConfig(latent_dim=D, noise_scale=0.2, flow=flow,
                        decoder=DecoderConfig(width=16, depth=1, heads=2, ffn=32),
                        train=TrainConfig(steps=100, warmup_steps=0), **kw)


def batch(B: int = 4, seed: int = 0, lengths=(8, 5, 3, 8)):
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(B, T, H, generator=g) * 3 + 1).half()
    tokens = torch.randint(0, V, (B, T), generator=g, dtype=torch.int32)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to(torch.uint8)
    return feats, tokens, mask


def pads_changed(kind: str, pad_positions: str):
    """A model with a non-identity flow (so it mixes positions), a batch, the same batch with other
    features and tokens at its pads, and the loss on both."""
    torch.manual_seed(0)
    model = StageAModel(H, V, tiny_cfg(kind, pad_positions=pad_positions))
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    feats, tokens, mask = batch()
    eps = torch.randn(4, T, D)
    f2, t2 = feats.clone(), tokens.clone()
    pad = ~mask.bool()
    f2[pad] = (torch.randn(int(pad.sum()), H) * 50).half()
    t2[pad] = 7
    m1 = model.loss(feats, tokens, mask, step=0, eps=eps)
    m2 = model.loss(f2, t2, mask, step=0, eps=eps)
    return model, eps, (feats, tokens, mask, m1), (f2, t2, m2), pad


@pytest.mark.parametrize("kind", ["realnvp", "realnvp_mlp", "tarflow"])
def test_passthrough_ablation_pads_do_not_affect_loss_or_real_latents(kind):
    """The "passthrough" ablation (our earlier design): pads are noise the flow passes through."""
    model, eps, (feats, tokens, mask, (l1, m1)), (f2, t2, (l2, m2)), pad = pads_changed(kind, "passthrough")
    assert torch.allclose(l1, l2, atol=1e-6)
    for k in ("ce", "kl", "flow_nll", "rec_acc"):
        assert torch.allclose(m1[k], m2[k], atol=1e-6), k
    u1 = model.encode_latent(feats, mask, eps)
    u2 = model.encode_latent(f2, mask, eps)
    z1, z2 = model.to_gaussian(u1, mask), model.to_gaussian(u2, mask)
    real = mask.bool()
    assert torch.allclose(z1[real], z2[real], atol=1e-6)
    # At pads the latent is the raw noise (so stored pads are exactly N(0, I)).
    assert torch.equal(u1[pad], eps[pad]) and torch.equal(z1[pad], eps[pad])


@pytest.mark.parametrize("kind", ["realnvp", "realnvp_mlp", "tarflow"])
def test_every_position_is_encoded_and_scored(kind):
    """The paper's design (Algorithm 1): what stands at the pads changes the loss and the latents
    (z carries the length), and the flow runs without a mask: z = flow(u) on the whole block."""
    model, eps, (feats, tokens, mask, (l1, m1)), (f2, t2, (l2, m2)), pad = pads_changed(kind, "encoded")
    for k in ("ce", "kl", "flow_nll"):
        assert not torch.allclose(m1[k], m2[k], atol=1e-4), k
    u1 = model.encode_latent(feats, mask, eps)
    mean, logvar = model.posterior(feats)
    torch.testing.assert_close(u1, mean + (0.5 * logvar).exp() * eps)  # pads encoded like any position
    torch.testing.assert_close(model.to_gaussian(u1, mask), model.flow(u1)[0])  # no mask
    z2 = model.to_gaussian(model.encode_latent(f2, mask, eps), mask)
    assert not torch.allclose(model.to_gaussian(u1, mask)[~pad], z2[~pad], atol=1e-4)  # the flow mixes positions


@pytest.mark.parametrize("pad_positions", ["encoded", "passthrough"])
def test_loss_terms_match_their_definitions(pad_positions):
    torch.manual_seed(1)
    model = StageAModel(H, V, tiny_cfg(learned_logvar=True, pad_positions=pad_positions))
    feats, tokens, mask = batch(seed=1)
    eps = torch.randn(4, T, D)
    loss, m = model.loss(feats, tokens, mask, step=0, eps=eps)
    mean, logvar = model.posterior(feats)
    # the scored positions: all of them (the paper), real tokens only (the ablation)
    real = torch.ones_like(mask, dtype=torch.bool) if pad_positions == "encoded" else mask.bool()
    q = torch.distributions.Normal(mean[real], (0.5 * logvar[real]).exp())
    kl_ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).mean()
    assert m["kl"].item() == pytest.approx(kl_ref.item(), rel=1e-5)
    # Identity flow at init: NLL = Gaussian NLL of u at real tokens, per element.
    u = model.encode_latent(feats, mask, eps)
    nll_ref = (0.5 * u[real].pow(2) + 0.5 * math.log(2 * math.pi)).mean()
    assert m["flow_nll"].item() == pytest.approx(nll_ref.item(), rel=1e-5)
    assert m["bpd"].item() == pytest.approx(nll_ref.item() / math.log(2), rel=1e-5)
    logits = model.decode(u, mask)
    ce_ref = torch.nn.functional.cross_entropy(logits[real], tokens[real].long())
    assert m["ce"].item() == pytest.approx(ce_ref.item(), rel=1e-5)
    c = model.cfg
    # Eq. 1 (sums over the sequence) divided by the number of scored positions: KL and flow NLL
    # summed over the d channels of a position, CE per position
    n_pos = int(real.sum())
    kl_pos = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum() / n_pos
    nll_pos = (0.5 * u[real].pow(2) + 0.5 * math.log(2 * math.pi)).sum() / n_pos
    assert kl_pos.item() == pytest.approx(D * kl_ref.item(), rel=1e-5)
    expect = c.lambda_rec * ce_ref + c.lambda_kl * kl_pos + 0.5 * nll_pos
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_lambda_flow_anneals_over_first_5_percent():
    model = StageAModel(H, V, tiny_cfg())  # 100 steps -> ramp over 5 steps
    assert model.lambda_flow(0) == pytest.approx(0.5)
    assert model.lambda_flow(2) == pytest.approx(0.7)
    assert model.lambda_flow(5) == pytest.approx(1.0)
    assert model.lambda_flow(80) == pytest.approx(1.0)


def test_feature_stats_estimation_and_use():
    feats, _, mask = batch(seed=2)
    mean, std = StageAModel.estimate_feature_stats([(feats, mask)])
    real = feats.float()[mask.bool()]
    assert torch.allclose(mean, real.mean(0), atol=1e-4)
    assert torch.allclose(std, real.std(0, unbiased=False), atol=1e-4)
    model = StageAModel(H, V, tiny_cfg())
    model.set_feature_stats(mean, std)
    normed = model.normalize(feats)[mask.bool()]
    assert normed.mean(0).abs().max() < 1e-4 and (normed.std(0, unbiased=False) - 1).abs().max() < 1e-3


@pytest.mark.parametrize("kind", ["realnvp", "realnvp_mlp", "tarflow"])
def test_loss_decreases_with_a_plain_optimizer(kind):
    torch.manual_seed(3)
    model = StageAModel(H, V, tiny_cfg(kind))
    feats, tokens, mask = batch(seed=3)
    model.set_feature_stats(*StageAModel.estimate_feature_stats([(feats, mask)]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss, metrics = model.loss(feats, tokens, mask, step=10)  # past the anneal: fixed objective
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("kind", ["realnvp", "realnvp_mlp", "tarflow"])
def test_export_load_round_trip(tmp_path, kind):
    torch.manual_seed(4)
    model = StageAModel(H, V, tiny_cfg(kind))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    feats, tokens, mask = batch(seed=4)
    model.set_feature_stats(*StageAModel.estimate_feature_stats([(feats, mask)]))
    meta = {"seq_len": T, "tokenizer": {"hash": "abc", "vocab_size": V}, "encoder": {"name": "x", "hash": "y"}}
    out = export_stage_a(model, str(tmp_path / "export"), meta)
    h1 = artifact_hash(out)
    loaded, meta2 = load_stage_a(out)
    assert meta2["seq_len"] == T and meta2["tokenizer"]["hash"] == "abc" and meta2["feature_dim"] == H
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(model.cfg)
    eps = torch.randn(4, T, D)
    model.eval()
    with torch.no_grad():
        u1, u2 = model.encode_latent(feats, mask, eps), loaded.encode_latent(feats, mask, eps)
        assert torch.equal(u1, u2)
        assert torch.equal(model.to_gaussian(u1, mask), loaded.to_gaussian(u2, mask))
        assert torch.equal(model.decode(u1, mask), loaded.decode(u2, mask))
        assert torch.equal(model.loss(feats, tokens, mask, 3, eps)[0], loaded.loss(feats, tokens, mask, 3, eps)[0])
    assert not any(p.requires_grad for p in loaded.parameters())
    # Re-export replaces atomically and is deterministic in content.
    export_stage_a(model, out, meta)
    assert artifact_hash(out) == h1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_flops_per_sample_counts_the_vocab_head():
    small = StageAModel(H, V, tiny_cfg())
    big = StageAModel(H, 10 * V, tiny_cfg())
    diff = big.flops_per_sample(T) - small.flops_per_sample(T)
    assert diff == pytest.approx(3 * T * 2 * 16 * 9 * V)


@pytest.mark.parametrize("kind", ["realnvp", "tarflow"])
def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(kind, monkeypatch):
    """stage_a.train.activation_checkpointing (applied by distributed.parallelize): every transformer
    block (flow conditioners, decoder) runs again in backward, and loss and gradients are unchanged."""
    from coupling_dist.distributed.parallelize import ParallelDims, parallelize
    from coupling_dist.models.layers import Block

    calls = [0]
    block_forward = Block.forward

    def counted(self, *a, **k):  # (forward hooks do not fire during checkpoint recomputation)
        calls[0] += 1
        return block_forward(self, *a, **k)

    monkeypatch.setattr(Block, "forward", counted)
    feats, tokens, mask = batch()
    eps = torch.randn(4, T, D, generator=torch.Generator().manual_seed(1))
    runs = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = parallelize(StageAModel(H, V, tiny_cfg(kind)), ParallelDims(), activation_checkpointing=ac)
        calls[0] = 0
        loss, _ = model.loss(feats, tokens, mask, step=3, eps=eps)
        forward_calls = calls[0]
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                     forward_calls, calls[0]))
    (l0, g0, f0, t0), (l1, g1, f1, t1) = runs
    assert t0 == f0 and f1 == f0 and t1 == 2 * f0 > 0  # recomputed in backward only with checkpointing
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-6, msg=n)

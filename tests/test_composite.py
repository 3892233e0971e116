"""The token-embedding Stage A encoder and the composite one-step generator G = D(NF^-1(z))."""
from __future__ import annotations

import pytest
import torch

from coupling_dist.losses.kd_loss import sequence_loss
from coupling_dist.models.composite_generator import UNUSED_ROW_LOGIT, CompositeGenerator, composite_arch
from coupling_dist.models.generator import export_generator, load_generator
from coupling_dist.models.stage_a import StageAModel
from coupling_dist.models.stage_a_export import export_stage_a, load_stage_a
from test_stage_a_model import D, T, V, batch, tiny_cfg


def trained_looking_stage_a(seed: int = 0, kind: str = "realnvp") -> StageAModel:
    torch.manual_seed(seed)
    model = StageAModel(0, V, tiny_cfg(kind))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-identity flow, non-zero decoder
    return model.eval()


def test_token_embedding_encoder_learns_and_round_trips(tmp_path):
    """feature_dim 0: the posterior mean is a learned embedding of the token ids; the loss trains
    it (reconstruction improves) and the export reloads to the same latents."""
    torch.manual_seed(1)
    model = StageAModel(0, V, tiny_cfg(learned_logvar=True))
    assert model.embeds_tokens and model.proj is None
    _, tokens, mask = batch(seed=1)
    mean, logvar = model.posterior(tokens)
    assert torch.equal(mean, model.embed(tokens.long()))
    assert torch.allclose(logvar, torch.full_like(logvar, 2 * torch.log(torch.tensor(0.2))))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(40):
        loss, m = model.loss(tokens, tokens, mask, step)
        first = first if first is not None else m["ce"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["ce"].item() < 0.5 * first and model.embed.weight.grad is not None
    out = export_stage_a(model, str(tmp_path / "a"), {"seq_len": T})
    loaded, meta = load_stage_a(out)
    assert meta["feature_dim"] == 0 and loaded.embeds_tokens
    eps = torch.randn(4, T, D)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_latent(tokens, mask, eps), loaded.encode_latent(tokens, mask, eps))


@pytest.mark.parametrize("kind", ["realnvp", "realnvp_mlp"])
def test_composite_starts_as_stage_a_map_and_trains_through_the_chunked_loss(tmp_path, kind):
    stage_a = trained_looking_stage_a(kind=kind)
    rows = 64  # Stage B pads its head beyond Stage A's V rows
    gen = CompositeGenerator(composite_arch(stage_a.cfg), D, T, rows)
    gen.load_stage_a(stage_a.state_dict())
    z = torch.randn(3, T, D)
    with torch.no_grad():
        want = stage_a.decode(stage_a.from_gaussian(z))
        got = gen(z)
    torch.testing.assert_close(got[..., :V], want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[..., V:] == UNUSED_ROW_LOGIT)
    # the loss reads hidden() and head.weight only (no bias): it must see exactly these logits
    tokens = torch.randint(0, V, (3, T))
    w = torch.full((3, T), 1.0 / (3 * T))
    ce = sequence_loss(gen.hidden(z), tokens, w, gen.head.weight, vocab_size=rows)[1]
    ref = torch.nn.functional.cross_entropy(want.reshape(-1, V), tokens.reshape(-1))
    torch.testing.assert_close(ce, ref, rtol=1e-4, atol=1e-5)
    # export -> load reproduces the generator (the arch is Stage A's config)
    meta = {"latent_dim": D, "seq_len": T, "vocab_size": rows}
    out = export_generator(gen, composite_arch(stage_a.cfg), meta, str(tmp_path / "g"))
    loaded, m = load_generator(out)
    assert m["kind"] == "composite"
    with torch.no_grad():
        assert torch.equal(loaded(z), got)


def test_composite_preflight_refuses_what_it_cannot_build(tmp_path):
    """The composite starts from the pair store's own Stage A export: a moved/changed export, a
    TarFlow (sequential inverse) or stage_b.tp > 1 are refused with the key and the fix."""

    from conftest import demo_cfg
    from coupling_dist.components.preflight import PreflightError
    from coupling_dist.models.stage_a_export import artifact_hash
    from coupling_dist.stages.stage_b.preflight import check_composite
    from test_stage_a_model import tiny_cfg as cfg_of

    art = export_stage_a(trained_looking_stage_a(), str(tmp_path / "a"), {"seq_len": T})
    man = {"stage_a_artifact": {"path": art, "sha256": artifact_hash(art)}}
    cfg = demo_cfg(tmp_path, "stage_b.model.kind=composite")
    assert check_composite(cfg, man, "store/manifest.json") == art
    with pytest.raises(PreflightError, match="stage_b.tp=1"):
        check_composite(demo_cfg(tmp_path, "stage_b.model.kind=composite", "stage_b.tp=2"), man, "m")
    with pytest.raises(PreflightError, match="sha256 differs"):
        check_composite(cfg, {"stage_a_artifact": {"path": art, "sha256": "0" * 64}}, "m")
    with pytest.raises(PreflightError, match="is gone"):
        check_composite(cfg, {"stage_a_artifact": {"path": str(tmp_path / "nowhere"), "sha256": "x"}}, "m")
    torch.manual_seed(0)
    tar = export_stage_a(StageAModel(0, V, cfg_of("tarflow")), str(tmp_path / "t"), {"seq_len": T})
    with pytest.raises(PreflightError, match="realnvp"):
        check_composite(cfg, {"stage_a_artifact": {"path": tar, "sha256": artifact_hash(tar)}}, "m")

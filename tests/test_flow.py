"""Stage A flows (RealNVP with transformer or MLP conditioners, TarFlow): exact inverse, exact
log-det, pads, Gaussian NLL at init."""
from __future__ import annotations

import math

import pytest
import torch

from coupling_dist.models.realnvp import RealNVP
from coupling_dist.models.tarflow import TarFlow

# name -> factory(dim, positions, **kw): the MLP conditioner is built for a fixed length
FLOWS = {"realnvp": lambda d, T, **kw: RealNVP(d, **kw),
         "realnvp_mlp": lambda d, T, **kw: RealNVP(d, conditioner="mlp", positions=T, **kw),
         "tarflow": lambda d, T, **kw: TarFlow(d, **kw)}


def make_flow(kind: str, dim: int = 4, layers: int = 4, seed: int = 0, perturb: float = 0.3, T: int = 6,
              depth: int = 1):
    """A tiny float64 flow; the zero-initialised output layers are perturbed so that the flow is
    not the identity (otherwise the inverse/log-det checks would be trivial)."""
    torch.manual_seed(seed)
    flow = FLOWS[kind](dim, T, layers=layers, hidden=16, depth=depth, heads=2, scale_bound=2.0).double()
    with torch.no_grad():
        for layer in flow.layers:
            out = layer.out if hasattr(layer, "out") else layer.cond.out
            out.weight.normal_(0, perturb)
            out.bias.normal_(0, perturb)
    return flow


def pad_mask(B: int, T: int, lengths) -> torch.Tensor:
    return torch.arange(T)[None] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("kind", list(FLOWS))
@pytest.mark.parametrize("with_pads", [False, True])
def test_inverse_is_exact(kind, with_pads):
    flow = make_flow(kind)
    B, T, d = 3, 6, 4
    u = torch.randn(B, T, d, dtype=torch.float64)
    mask = pad_mask(B, T, [6, 4, 1]) if with_pads else None
    with torch.no_grad():
        z, logdet = flow(u, mask)
        back = flow.inverse(z, mask)
    assert (z - u).abs().max() > 1e-2, "flow is (nearly) the identity: the test would prove nothing"
    assert torch.allclose(back, u, atol=1e-5, rtol=0), (back - u).abs().max()
    assert torch.isfinite(logdet).all()
    if with_pads:
        m = mask[..., None].expand_as(u)
        assert torch.equal(z[~m], u[~m]), "pads must pass through unchanged"


@pytest.mark.parametrize("kind", list(FLOWS))
@pytest.mark.parametrize("with_pads", [False, True])
def test_logdet_matches_autograd_jacobian(kind, with_pads):
    flow = make_flow(kind, dim=4, layers=3, seed=1, T=5, depth=2)
    T, d = 5, 4
    u = torch.randn(1, T, d, dtype=torch.float64)
    mask = pad_mask(1, T, [3]) if with_pads else None

    def f(flat):
        return flow(flat.view(1, T, d), mask)[0].reshape(-1)

    J = torch.autograd.functional.jacobian(f, u.reshape(-1))
    sign, brute = torch.linalg.slogdet(J)
    _, logdet = flow(u, mask)
    assert sign.item() > 0
    assert abs(brute.item()) > 1e-2, "log-det ~0: the check would be trivial"
    assert logdet.item() == pytest.approx(brute.item(), abs=1e-8)


@pytest.mark.parametrize("kind", list(FLOWS))
def test_pads_do_not_affect_real_outputs(kind):
    flow = make_flow(kind, seed=2, T=7)
    B, T, d = 2, 7, 4
    mask = pad_mask(B, T, [7, 4])
    u = torch.randn(B, T, d, dtype=torch.float64)
    u2 = u.clone()
    u2[1, 4:] = torch.randn(3, d, dtype=torch.float64) * 100  # change only pad values
    with torch.no_grad():
        z1, ld1 = flow(u, mask)
        z2, ld2 = flow(u2, mask)
    assert torch.equal(z1[1, :4], z2[1, :4]) or torch.allclose(z1[1, :4], z2[1, :4], atol=1e-12)
    assert torch.allclose(ld1, ld2, atol=1e-12)
    if kind == "realnvp_mlp":
        return  # built for 7 positions: no shorter sequence to compare with
    with torch.no_grad():  # the same real prefix as a shorter, unpadded sequence gives the same outputs
        z_short, ld_short = flow(u[1:2, :4], None)
    assert torch.allclose(z1[1, :4], z_short[0], atol=1e-10)
    assert ld1[1].item() == pytest.approx(ld_short[0].item(), abs=1e-10)


@pytest.mark.parametrize("kind", list(FLOWS))
def test_identity_init_gaussian_nll_is_analytic(kind):
    """At init (zero last layers) the flow is the identity, so the NLL of N(0, I) data is the
    Gaussian entropy 0.5 * log(2 pi e) nats per dim (up to sampling error)."""
    torch.manual_seed(3)
    flow = FLOWS[kind](8, 16, layers=4, hidden=16, depth=1, heads=2).double()
    u = torch.randn(256, 16, 8, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = flow(u)
    assert torch.equal(z, u) and torch.equal(logdet, torch.zeros_like(logdet))
    nll = (0.5 * z.pow(2) + 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2)) - logdet
    per_dim = nll.mean().item() / (16 * 8)
    assert per_dim == pytest.approx(0.5 * math.log(2 * math.pi * math.e), abs=0.01)


def test_mlp_conditioner_couples_every_position_and_refuses_another_length():
    """The MLP couplings see the whole flattened block: an output at the first position moves when
    only the last position's input moves (over two couplings every element is transformed once);
    a batch of another length is refused with the key to set, not silently mis-shaped."""
    flow = make_flow("realnvp_mlp", T=6)
    u = torch.randn(2, 6, 4, dtype=torch.float64)
    u2 = u.clone()
    u2[:, -1] += 1.0
    with torch.no_grad():
        z1, z2 = flow(u)[0], flow(u2)[0]
    assert (z1[:, 0] - z2[:, 0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="6 latent positions.*data.seq_len / stage_a.patch"):
        flow(torch.randn(2, 5, 4, dtype=torch.float64))
    halves = [layer.keep_idx for layer in flow.layers[:2]]
    assert sorted(torch.cat(halves).tolist()) == list(range(24))  # a pair of couplings: complementary halves

"""Chunked / vocab-parallel CE + KD (losses.kd_loss) against the naive full-logit computation."""
from __future__ import annotations

import json
import os

import pytest
import torch

from coupling_dist.losses.kd_loss import kd_loss, naive_sequence_loss, sequence_loss

from conftest import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


def _case(seed=0, B=3, T=7, H=16, Ht=12, V=50):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    th, wt = torch.randn(B, T, Ht, generator=g), torch.randn(V, Ht, generator=g)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    return h, w, th, wt, tok, mask


@pytest.mark.parametrize("chunk_vocab,chunk_rows", [(7, 4), (50, 5), (64, 100)])
@pytest.mark.parametrize("eps,lam_kd,temp", [(0.0, 1.0, 2.0), (0.1, 0.6, 1.5)])
def test_chunked_equals_naive(chunk_vocab, chunk_rows, eps, lam_kd, temp):
    h, w, th, wt, tok, mask = _case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    tot, ce, kd = sequence_loss(h1, tok, mask, w1, teacher_hidden=th, teacher_weight=wt, kd_mask=mask,
                                label_smoothing=eps, lambda_kd=lam_kd, temperature=temp,
                                chunk_vocab=chunk_vocab, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(tot, [h1, w1])
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    tot2, ce2, kd2 = naive_sequence_loss(h2 @ w2.t(), tok, mask, teacher_logits=th @ wt.t(), kd_mask=mask,
                                         label_smoothing=eps, lambda_kd=lam_kd, temperature=temp)
    gh2, gw2 = torch.autograd.grad(tot2, [h2, w2])
    assert kd2.item() > 0.1 and ce2.item() > 0.1  # a non-trivial case
    for a, b in ((tot, tot2), (ce, ce2), (kd, kd2)):
        assert abs(a.item() - b.item()) < 1e-5 * max(1.0, abs(b.item()))
    torch.testing.assert_close(gh, gh2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw2, atol=1e-5, rtol=1e-5)


def test_pads_and_first_position_do_not_matter():
    """Changing the student rows or teacher rows of pads (and the teacher's last position, which
    predicts beyond the sequence) must not change the loss."""
    h, w, th, wt, tok, mask = _case(1)
    base = sequence_loss(h, tok, mask, w, teacher_hidden=th, teacher_weight=wt, kd_mask=mask)[0]
    h2, th2 = h.clone(), th.clone()
    h2[~mask] += 5.0
    th2[:, -1] += 3.0
    pad_next = torch.zeros_like(mask)
    pad_next[:, 1:] = ~mask[:, 1:]
    th2[:, :-1][pad_next[:, 1:]] += 4.0  # teacher states that only predict pads
    other = sequence_loss(h2, tok, mask, w, teacher_hidden=th2, teacher_weight=wt, kd_mask=mask)[0]
    assert abs(base.item() - other.item()) < 1e-5
    h3 = h.clone()
    h3[mask] += 0.5
    assert abs(base.item() - sequence_loss(h3, tok, mask, w, teacher_hidden=th, teacher_weight=wt, kd_mask=mask)[0].item()) > 1e-3


def test_ce_only_and_no_grad():
    h, w, _, _, tok, mask = _case(2)
    with torch.no_grad():
        tot, ce, kd = sequence_loss(h, tok, mask, w, chunk_vocab=9)
    ref = naive_sequence_loss(h @ w.t(), tok, mask)[1]
    assert abs(ce.item() - ref.item()) < 1e-5 and kd.item() == 0.0 and abs(tot.item() - ce.item()) < 1e-7


def test_teacher_shard_shape_mismatch_is_refused():
    h, w, th, wt, tok, mask = _case(3)
    with pytest.raises(ValueError, match="teacher head shard"):
        kd_loss(h.reshape(-1, h.shape[-1]), w, tok.reshape(-1), torch.ones(tok.numel()),
                teacher_hidden=th.reshape(-1, th.shape[-1]), teacher_weight=wt[:10], kd_weight=torch.ones(tok.numel()))


@pytest.mark.parametrize("nproc", [1, 2])
def test_vocab_parallel_equals_naive(tmp_path, nproc):
    """Real ranks: each holds a vocabulary shard of the student and the teacher heads."""
    torchrun(nproc, [os.path.join(HERE, "stage_b_worker.py"), "kd", str(tmp_path)], timeout=300)
    for r in range(nproc):
        with open(tmp_path / f"rank{r}.json") as fh:
            res = json.load(fh)
        for case in res.values():
            assert case["kd_value"] > 0.1 and case["ce_value"] > 0.1
            for k in ("total", "ce", "kd", "grad_h", "grad_w"):
                assert case[k] < 1e-5, (r, k, case)


# --------------------------------------------------------------------------- cached top-k teacher


def _cached(th, wt, k, temp):
    from coupling_dist.models.teacher import topk_from_logits

    return topk_from_logits(th @ wt.t(), k, temp)


@pytest.mark.parametrize("chunk_vocab,chunk_rows", [(7, 4), (64, 100)])
@pytest.mark.parametrize("k,temp", [(1, 2.0), (5, 1.5), (20, 2.0)])
def test_cached_topk_equals_grouped_kl(chunk_vocab, chunk_rows, k, temp):
    """Cached KD = the grouped KL (top-k buckets + one tail bucket, student grouped alike) computed
    directly from the full teacher and student logits: values and gradients."""
    h, w, th, wt, tok, mask = _case(4)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    tot, ce, kd = sequence_loss(h1, tok, mask, w1, teacher_topk=_cached(th, wt, k, temp), kd_mask=mask,
                                temperature=temp, lambda_kd=0.7, chunk_vocab=chunk_vocab, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(tot, [h1, w1])
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    tot2, ce2, kd2 = naive_sequence_loss(h2 @ w2.t(), tok, mask, teacher_logits=th @ wt.t(), kd_mask=mask,
                                         temperature=temp, lambda_kd=0.7, teacher_topk=k)
    gh2, gw2 = torch.autograd.grad(tot2, [h2, w2])
    assert kd2.item() > 1e-3
    for a, b in ((tot, tot2), (ce, ce2), (kd, kd2)):
        assert abs(a.item() - b.item()) < 1e-5 * max(1.0, abs(b.item())), (a, b)
    torch.testing.assert_close(gh, gh2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw2, atol=1e-5, rtol=1e-5)
    # the grouped KL is a coarsening of the full one: never larger (data-processing inequality)
    assert kd.item() <= sequence_loss(h, tok, mask, w, teacher_hidden=th, teacher_weight=wt, kd_mask=mask,
                                      temperature=temp)[2].item() + 1e-6


@pytest.mark.parametrize("chunk_vocab", [7, 64])
def test_cached_all_ids_equals_live_kd(chunk_vocab):
    """k = V: the tail is empty (log-mass -inf) and the cached KD is the full live KD."""
    h, w, th, wt, tok, mask = _case(5)
    V = w.shape[0]
    ids, logp, tail = _cached(th, wt, V, 2.0)
    assert torch.isinf(tail).all() and (tail < 0).all()
    out = []
    for kw in ({"teacher_topk": (ids, logp, tail)}, {"teacher_hidden": th, "teacher_weight": wt}):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        tot, _, kd = sequence_loss(h1, tok, mask, w1, kd_mask=mask, chunk_vocab=chunk_vocab, chunk_rows=6, **kw)
        out.append((tot, kd, *torch.autograd.grad(tot, [h1, w1])))
    (a, ka, gha, gwa), (b, kb, ghb, gwb) = out
    assert torch.isfinite(a) and abs(a.item() - b.item()) < 1e-5 and abs(ka.item() - kb.item()) < 1e-5
    torch.testing.assert_close(gha, ghb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gwa, gwb, atol=1e-5, rtol=1e-5)

"""Multi-rank checks for Stage B, run under torchrun by tests/test_tensor_parallel.py and
tests/test_kd_loss.py. Every rank builds the TP = 1 reference itself (same seed), runs the
tensor-parallel version on real ranks, and writes its measured differences to OUT/rank{r}.json;
the tests assert on those numbers.

    python -m torch.distributed.run --nproc_per_node=N tests/stage_b_worker.py {tp|kd} OUT [TP]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coupling_dist.components import dist as D  # noqa: E402
from coupling_dist.distributed.parallel_state import init_parallel  # noqa: E402


def maxdiff(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def gather_vocab(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, -1)


def check_tp(tp: int, kind: str, num_classes: int = 0, patch: int = 1) -> dict:
    """TP = tp vs TP = 1 from the same initial weights: logits, loss, every gradient (with
    ``num_classes`` > 0 a class-conditional generator fed labels, one of them the null class; with
    ``patch`` > 1 ``patch`` tokens per latent position through the replicated ``unpatch`` layer, the
    binary-image / DNA shape)."""
    import copy

    from coupling_dist.config import GeneratorConfig
    from coupling_dist.distributed.tensor_parallel import apply_tensor_parallel, gather_full_state_dict, head_shard
    from coupling_dist.losses.kd_loss import sequence_loss
    from coupling_dist.models.generator import Generator

    mpu = init_parallel(tp, seed=0)
    group = mpu.get_tensor_model_parallel_group()
    V, T, d = 96, 6, 5
    gcfg = GeneratorConfig(kind=kind, width=32, depth=2, heads=4, ffn=64, act="swiglu" if kind == "onestep" else "gelu",
                           norm="rmsnorm" if kind == "onestep" else "layernorm", attention="sdpa")
    torch.manual_seed(1234)
    ref = Generator(gcfg, d, T, V, mask_token_id=V - 1 if kind == "masked" else None, num_classes=num_classes,
                    patch=patch)
    model = apply_tensor_parallel(copy.deepcopy(ref), group)
    g = torch.Generator().manual_seed(7)  # same batch on every rank (a TP group sees one batch)
    z = torch.randn(3, T // patch, d, generator=g)
    tok = torch.randint(0, V - 1, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[1, 4:] = False
    th = torch.randn(3, T, 12, generator=g)
    wt_full = torch.randn(V, 12, generator=g)
    x_t = torch.where(torch.rand(3, T, generator=g) < 0.5, torch.full_like(tok, V - 1), tok) if kind == "masked" else None
    labels = torch.tensor([2, -1, 0]) if num_classes else None

    def run(m, shard: bool):
        m.zero_grad()
        h = m.hidden(z, x_t, labels)
        w, start, _ = head_shard(m)
        wt = wt_full[start:start + w.shape[0]]
        loss, ce, kd = sequence_loss(h, tok, mask, w, teacher_hidden=th, teacher_weight=wt, kd_mask=mask,
                                     label_smoothing=0.1, vocab_start=start, vocab_size=V,
                                     tp_group=group if shard else None, chunk_rows=4, chunk_vocab=20)
        loss.backward()
        logits = m(z, x_t, labels).detach()
        return logits, loss.detach(), ce, kd

    l1, loss1, ce1, kd1 = run(ref, False)
    l2, loss2, ce2, kd2 = run(model, True)
    grads = {n: p.grad for n, p in model.named_parameters()}
    full_grads = gather_full_state_dict(model, grads)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    weights = gather_full_state_dict(model)
    out = {"logits": maxdiff(gather_vocab(l2, group), l1), "loss": abs(float(loss1 - loss2)),
           "ce": abs(float(ce1 - ce2)), "kd": abs(float(kd1 - kd2)), "kd_value": float(kd1),
           "grad": max(maxdiff(full_grads[n], ref_grads[n]) for n in ref_grads),
           "grad_names": sorted(set(ref_grads) ^ set(full_grads)),
           "weights": max(maxdiff(weights[n], v) for n, v in ref.state_dict().items()),
           "weight_names": sorted(set(ref.state_dict()) ^ set(weights)),
           "local_head_rows": int(model.head.weight.shape[0]), "local_q_out": int(model.trunk.blocks[0].attn.q.weight.shape[0]),
           "head_class": type(model.head).__mro__[1].__name__}
    return out


def check_rng_tracker() -> dict:
    """megatron's model-parallel RNG tracker works on CPU (megatron_shim) and forks per TP rank."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from coupling_dist.distributed import megatron_shim

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        draw = torch.rand(4)
    untouched = bool(torch.equal(before, torch.get_rng_state()))
    parts = [torch.empty(4) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, draw)
    return {"shim": megatron_shim.applied(), "outer_rng_untouched": untouched,
            "tp_ranks_differ": not torch.equal(parts[0], parts[1])}


def check_kd(tp: int) -> dict:
    """Vocab-parallel chunked CE + KD vs the naive full-logit loss (values and gradients)."""
    from coupling_dist.losses.kd_loss import naive_sequence_loss, sequence_loss
    from coupling_dist.models.teacher import topk_from_logits

    mpu = init_parallel(tp, seed=0)
    group = mpu.get_tensor_model_parallel_group()
    r, n = mpu.get_tensor_model_parallel_rank(), tp
    g = torch.Generator().manual_seed(3)
    B, T, H, Ht, V = 2, 9, 16, 10, 64
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.7
    th, wt = torch.randn(B, T, Ht, generator=g), torch.randn(V, Ht, generator=g)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 6:] = False
    out = {}
    # the cached top-k teacher (k = 7, ids spread over every shard) against its grouped-KL definition
    for eps, lam, k in ((0.0, 1.0, None), (0.2, 0.5, None), (0.1, 0.8, 7)):
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        tot, ce, kd = naive_sequence_loss(hr @ wr.t(), tok, mask, teacher_logits=th @ wt.t(), kd_mask=mask,
                                          label_smoothing=eps, lambda_kd=lam, teacher_topk=k)
        gh_ref, gw_ref = torch.autograd.grad(tot, [hr, wr])
        Vl = V // n
        hs = h.clone().requires_grad_()
        ws = w[r * Vl:(r + 1) * Vl].clone().requires_grad_()
        teacher = ({"teacher_hidden": th, "teacher_weight": wt[r * Vl:(r + 1) * Vl]} if k is None
                   else {"teacher_topk": topk_from_logits(th @ wt.t(), k, 2.0)})
        tot2, ce2, kd2 = sequence_loss(hs, tok, mask, ws, kd_mask=mask, label_smoothing=eps, lambda_kd=lam,
                                       vocab_start=r * Vl, vocab_size=V, tp_group=group, chunk_rows=5, chunk_vocab=12,
                                       **teacher)
        gh, gw = torch.autograd.grad(tot2, [hs, ws])
        key = f"eps{eps}" + (f"_top{k}" if k else "")
        out[key] = {"total": abs(float(tot.detach() - tot2.detach())), "ce": abs(float(ce - ce2)), "kd": abs(float(kd - kd2)),
                    "grad_h": maxdiff(gh, gh_ref), "grad_w": maxdiff(gather_vocab(gw.t(), group).t(), gw_ref),
                    "kd_value": float(kd.detach()), "ce_value": float(ce.detach())}
    return out


def main() -> int:
    what, out_dir = sys.argv[1], sys.argv[2]
    tp = int(sys.argv[3]) if len(sys.argv) > 3 else D.launch_env()["world"]
    torch.set_default_dtype(torch.float32)
    if what == "tp":
        res = {kind: check_tp(tp, kind) for kind in ("onestep", "masked")}
        res["masked_conditional"] = check_tp(tp, "masked", num_classes=3)
        res["onestep_patch_conditional"] = check_tp(tp, "onestep", num_classes=3, patch=2)
        res["rng"] = check_rng_tracker()
    elif what == "kd":
        res = check_kd(tp)
    else:
        raise SystemExit(f"unknown check {what}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{D.rank()}.json"), "w") as fh:
        json.dump(res, fh)
    D.barrier()
    D.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

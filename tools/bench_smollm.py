"""SmolLM2-135M in the demo: the truncated frozen encoder's speed, and what the compact vocabulary's
KD restriction changes.

    python tools/bench_smollm.py [--sentences 256] [--layers 6 12] [--temperature 2.0]

1. Encoder: preprocess reads ``hidden_states[k]`` and runs only the first k of SmolLM2's 30 layers
   (``models/frozen_encoder.py``). Time per batch of the demo corpus (seq_len 32, batch 64) at each
   k vs the full model asked for the same hidden state, and the largest difference of the
   features (must be 0 up to float error: truncation changes the cost, not the result).
2. KD under ``data.vocab: corpus``: the teacher's distribution is restricted to the corpus ids and
   renormalised (``losses/kd_loss.py``). On the demo corpus at the KD temperature, per position:
   the teacher mass outside the compact vocabulary, and KL(restricted || full) = -log(mass inside),
   the distance between the KD target we use and the full-vocabulary one. Printed as mean, median
   and 95th percentile over real-token positions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vocab import corpus_rows  # noqa: E402
from coupling_dist.components import assets  # noqa: E402

REF = "asset:smollm2-135m-gguf"


def corpus_batch(tok, n: int, T: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The demo corpus as preprocess stores it (ids + EOS, pads = EOS, cut at T): the first ``n``
    sequences, their mask, and every id the whole corpus uses."""
    eos = tok.eos_token_id
    rows = corpus_rows(tok, "asset:lee-corpus", T)
    used = {eos, tok.pad_token_id if tok.pad_token_id is not None else eos}.union(*rows)
    sel = rows[:n]
    ids = torch.full((len(sel), T), eos, dtype=torch.long)
    mask = torch.zeros(len(sel), T, dtype=torch.long)
    for i, r in enumerate(sel):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask, sorted(used)


def bench_encoder(ids, layers, batch: int, reps: int) -> None:
    from coupling_dist.models.frozen_encoder import load_encoder

    full_att = torch.ones_like(ids)  # preprocess reads the padded sequence with full attention
    print(f"encoder: SmolLM2-135M, {ids.shape[0]} sequences x {ids.shape[1]} tokens, batch {batch}, fp32 CPU, "
          f"{torch.get_num_threads()} threads")
    for k in layers:
        times, feats = {}, {}
        full = assets.load_causal_lm(REF).base_model.eval()  # every layer runs; hidden_states[k] kept
        runners = {"full": lambda x, m: full(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states[k],
                   "truncated": load_encoder(REF, k).eval()}
        for name, run in runners.items():
            with torch.no_grad():
                run(ids[:batch], full_att[:batch])  # warm-up
                t0 = time.perf_counter()
                for _ in range(reps):
                    out = [run(ids[i:i + batch], full_att[i:i + batch]) for i in range(0, ids.shape[0], batch)]
                times[name] = (time.perf_counter() - t0) / reps
            feats[name] = torch.cat(out)
        assert runners["truncated"].truncated
        diff = (feats["full"] - feats["truncated"]).abs().max().item()
        print(f"  layer {k:2d}: truncated {times['truncated']:.2f} s vs full {times['full']:.2f} s per pass "
              f"-> {times['full'] / times['truncated']:.2f}x faster; max |feature diff| {diff:.2e}")


def bench_kd_restriction(ids, mask, used, temperature: float) -> None:
    model = assets.load_causal_lm(REF)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float() / temperature
    logp = torch.log_softmax(logits, -1)
    inside = torch.logsumexp(logp[..., torch.tensor(used)], -1)  # log mass on the compact ids
    real = mask.bool()
    kl = -inside[real]  # KL(restricted || full) = -log Z_inside
    out_mass = 1 - inside[real].exp()
    q = torch.tensor([0.5, 0.95])
    print(f"KD restriction (data.vocab: corpus, {len(used)} of {logits.shape[-1]} ids, temperature {temperature}), "
          f"{int(real.sum())} real-token positions:")
    print(f"  teacher mass outside the compact ids: mean {out_mass.mean():.3f}, median "
          f"{out_mass.quantile(q[0]):.3f}, p95 {out_mass.quantile(q[1]):.3f}")
    print(f"  KL(restricted || full) nats/position: mean {kl.mean():.3f}, median {kl.quantile(q[0]):.3f}, "
          f"p95 {kl.quantile(q[1]):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--temperature", type=float, default=2.0)
    a = p.parse_args()
    tok = assets.load_tokenizer(REF)
    ids, mask, used = corpus_batch(tok, a.sentences, a.seq_len)
    bench_encoder(ids, a.layers, a.batch, a.reps)
    bench_kd_restriction(ids, mask, used, a.temperature)


if __name__ == "__main__":
    main()

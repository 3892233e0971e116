"""Benchmarks for sampling and evaluation (same process, same machine, ratios printed).

1. one-step sampling of N sequences of length L (one forward pass of a bidirectional latent-to-
   sequence transformer, then temperature + top-p at every position) vs KV-cached autoregressive
   decoding of L tokens (transformers ``generate``, use_cache=True, do_sample, same top-p) with a
   GPT-2 causal LM of (nearly) the same parameter count;
2. top-p: partial top-k with exact fallback vs full sort, at V = 151,936 rows, for a peaked
   (trained-like) and a flat (untrained-like) distribution;
3. scoring throughput of the Ray actor pool with 1 and 2 actors.

Defaults fit a 2-core CPU in a few minutes (smaller vocabulary for part 1); on a GPU use e.g.
``--device cuda --vocab 151936 --width 768 --depth 12 --heads 12 --ffn 2048 --batch 256``.

    python tools/bench_sampling.py [--parts onestep,topp,score] [...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coupling_dist.sampling.onestep import SampleSettings, sample_onestep  # noqa: E402
from coupling_dist.sampling.top_p import top_p_mask, top_p_mask_reference  # noqa: E402


class OneStepBench(nn.Module):
    """Shape stand-in for the Stage B generator: z -> linear -> + positions -> bidirectional blocks -> head."""

    def __init__(self, vocab, seq_len, latent, width, depth, heads, ffn):
        super().__init__()
        self.inp = nn.Linear(latent, width)
        self.pos = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, z):
        return self.head(self.norm(self.body(self.inp(z) + self.pos)))


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_onestep_vs_ar(a) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    gen = OneStepBench(a.vocab, a.seq_len, a.latent, a.width, a.depth, a.heads, a.ffn).to(dev, dtype).eval()
    # GPT-2 with tied embeddings: its embedding table is the head, so the counts match closely.
    ar = GPT2LMHeadModel(GPT2Config(vocab_size=a.vocab, n_positions=max(1024, 2 * a.seq_len), n_embd=a.width,
                                    n_layer=a.depth, n_head=a.heads, n_inner=a.ffn, bos_token_id=0,
                                    eos_token_id=0, tie_word_embeddings=True)).to(dev, dtype).eval()
    print(f"[onestep vs AR] N={a.num_samples} L={a.seq_len} V={a.vocab} width={a.width} depth={a.depth} "
          f"device={dev} dtype={dtype}")
    print(f"  params: one-step generator {nparams(gen) / 1e6:.2f} M, causal LM {nparams(ar) / 1e6:.2f} M")
    meta = {"kind": "onestep", "seq_len": a.seq_len, "latent_dim": a.latent, "vocab_size": a.vocab, "eos_id": 0}
    s = SampleSettings(temperature=0.6, top_p=0.95, latent_scale=0.85, seed=0)
    with torch.no_grad():
        sample_onestep(gen, meta, range(min(a.batch, 8)), s, batch_size=a.batch, device=dev)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        ids = sample_onestep(gen, meta, range(a.num_samples), s, batch_size=a.batch, device=dev)
        _sync(dev)
        t_one = time.perf_counter() - t0
        assert ids.shape == (a.num_samples, a.seq_len)
        print(f"  one-step: {t_one:.2f} s ({a.num_samples / t_one:.1f} samples/s)", flush=True)
        prompt = torch.zeros((a.batch, 1), dtype=torch.long, device=dev)
        kw = dict(do_sample=True, top_p=0.95, temperature=0.6, top_k=0, use_cache=True, max_new_tokens=a.seq_len,
                  min_new_tokens=a.seq_len, pad_token_id=0)
        ones = torch.ones_like(prompt)
        ar.generate(prompt[:min(a.batch, 8)], attention_mask=ones[:min(a.batch, 8)],
                    **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        done = 0
        while done < a.num_samples:
            n = min(a.batch, a.num_samples - done)
            out = ar.generate(prompt[:n], attention_mask=ones[:n], **kw)
            assert out.shape[1] == a.seq_len + 1
            done += n
        _sync(dev)
        t_ar = time.perf_counter() - t0
    print(f"  KV-cached autoregressive: {t_ar:.2f} s ({a.num_samples / t_ar:.1f} samples/s)")
    print(f"  ratio AR / one-step: {t_ar / t_one:.1f}x")


def bench_top_p(a) -> None:
    V = 151936
    print(f"[top-p] rows={a.topp_rows} V={V} p=0.95 device={a.device}")
    g = torch.Generator().manual_seed(0)
    for name, scale in (("peaked (logits N(0,1)*8)", 8.0), ("flat (logits N(0,1)*1)", 1.0)):
        lg = (torch.randn(a.topp_rows, V, generator=g) * scale).to(a.device)
        assert torch.equal(top_p_mask(lg, 0.95), top_p_mask_reference(lg, 0.95))
        ts = {}
        for label, fn in (("partial top-k + fallback", lambda: top_p_mask(lg, 0.95)),
                          ("full sort", lambda: top_p_mask_reference(lg, 0.95))):
            fn()
            _sync(torch.device(a.device))
            t0 = time.perf_counter()
            for _ in range(a.topp_reps):
                fn()
            _sync(torch.device(a.device))
            ts[label] = (time.perf_counter() - t0) / a.topp_reps
        f, r = ts["partial top-k + fallback"], ts["full sort"]
        print(f"  {name}: partial {f * 1e3:.1f} ms, full sort {r * 1e3:.1f} ms, speed-up {r / f:.2f}x")


def bench_score(a) -> None:
    from coupling_dist.components import assets
    from coupling_dist.evaluation.pool import ScorerPool

    ref = assets.resolve(a.scorer)
    tok = assets.load_tokenizer(ref)
    with open(assets.resolve("asset:lee-corpus"), encoding="utf-8") as fh:
        texts = [line.strip() for line in fh if line.strip()][:a.score_texts]
    print(f"[scoring] scorer={a.scorer} texts={len(texts)} batch={a.score_batch}")
    base = None
    for n in (1, 2):
        with ScorerPool(ref, num_actors=n, address=a.ray_address) as pool:
            pool.score(texts[:a.score_batch], None, tok, "mdlm", a.score_batch)  # warm-up
            r = pool.score(texts, None, tok, "mdlm", a.score_batch)
        tps = r["scored_tokens"] / r["score_seconds"]
        base = base or tps
        print(f"  {n} actor(s): {r['score_seconds']:.2f} s, {tps:.0f} scored tokens/s "
              f"({tps / base:.2f}x of 1 actor), Gen-PPL {r['gen_ppl']:.6g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="onestep,topp,score")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--latent", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--topp-rows", type=int, default=256)
    p.add_argument("--topp-reps", type=int, default=3)
    p.add_argument("--scorer", default="tiny:gpt2")
    p.add_argument("--score-texts", type=int, default=512)
    p.add_argument("--score-batch", type=int, default=16)
    p.add_argument("--ray-address", default=None)
    a = p.parse_args()
    parts = a.parts.split(",")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "topp" in parts:
        bench_top_p(a)
    if "onestep" in parts:
        bench_onestep_vs_ar(a)
    if "score" in parts:
        bench_score(a)


if __name__ == "__main__":
    main()

"""Stage A step with the frozen encoder run online (``stage_a.online_encoder``) vs stored features.

    python tools/bench_online_encoder.py [--steps 6] [--layer 6] [--batch 32]

The demo's Stage A shape (``configs/demo.yaml``: T 32, batch 32, d 8, 8 RealNVP couplings of width
64, decoder 128 x 3, heads over the compact vocabulary of the corpus ids) with the frozen
SmolLM2-135M (``asset:smollm2-135m-gguf``) read at ``--layer`` (6: the demo's frozen-encoder
option, README "The demo"), on real Lee-corpus sentences as preprocess stores them. One Trainer
(DeepSpeed ZeRO-1, the demo's), one model, the same batches; steps of the two kinds alternate so
that the machine's drift hits both alike. Prints, from this one run:
- the median step time with stored features (read from memory: the loader's cost is not in it)
  and with the encoder run inside the step, and their ratio;
- the encoder's share of the online step: its forward alone on the same batch / the online step
  (and the step-time difference / the online step, which should agree);
- peak RSS before and after the encoder is loaded (a GGUF is de-quantized to fp32 whole, then
  truncated to ``--layer`` layers), and the bytes per sample on disk each way (raw, before zstd).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vocab import corpus_rows  # noqa: E402
from coupling_dist.components import assets  # noqa: E402
from coupling_dist.components import dist as D  # noqa: E402
from coupling_dist.components.trainer import Trainer, training_dtype  # noqa: E402
from coupling_dist.config import RunConfig, load_config  # noqa: E402
from coupling_dist.models.frozen_encoder import OnlineFeatures  # noqa: E402
from coupling_dist.models.stage_a import StageAModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = "asset:smollm2-135m-gguf"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def corpus_batches(tok, T: int, B: int, n: int) -> tuple[list[dict], int]:
    """``n`` batches of B real sentences as preprocess stores them (ids + EOS, pads = EOS, mask),
    with targets as compact head rows (``data.vocab: corpus``); returns (batches, compact vocab size)."""
    rows = corpus_rows(tok, "asset:lee-corpus", T)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    used = sorted({tok.eos_token_id, pad}.union(*rows))
    compact = torch.full((max(used) + 1,), -1, dtype=torch.long)
    compact[torch.tensor(used)] = torch.arange(len(used))
    out = []
    for b in range(n):
        sel = [rows[(b * B + i) % len(rows)] for i in range(B)]
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.uint8)
        for i, r in enumerate(sel):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        out.append({"tokens": ids, "targets": compact[ids], "mask": mask})
    return out, len(used)


class Loader:
    """The Trainer wants a loader; the benchmark feeds the engine itself."""

    step = 0

    def __iter__(self):
        return iter(())

    def state_dict(self):
        return {"step": 0}

    def load_state_dict(self, s):
        pass


class BenchTask:
    """Stage A's loss on stored features or on the features the encoder computes in the step (what
    ``stages/stage_a/task.StageATask.features`` does)."""

    def __init__(self, cfg, feature_dim: int, vocab: int, seq_len: int):
        self.cfg, self.feature_dim, self.vocab, self.seq_len = cfg, feature_dim, vocab, seq_len
        self.encoder, self.model = None, None

    def build_model(self):
        self.model = StageAModel(self.feature_dim, self.vocab, self.cfg)
        return self.model

    def loss(self, model, batch, step):
        feats = self.encoder(batch["tokens"]) if batch["online"] else batch["features"]
        return model.loss(feats, batch["targets"], batch["mask"], step)

    def eval_metrics(self, model, batch):
        return {}

    def flops_per_sample(self):
        return {"stage_a": self.model.flops_per_sample(self.seq_len)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind (after one warm-up each)")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--batch", type=int, default=None, help="default: the demo's stage_a.train.batch_size")
    a = p.parse_args()
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"encoder.model={REF}", f"encoder.layer={a.layer}", "stage_a.train.resume=none",
                       "stage_a.train.peak_flops=1.0"])
    sa, T = cfg.stage_a, cfg.data.seq_len
    B = a.batch or sa.train.batch_size
    sa.train.batch_size = B
    D.init_distributed()
    device = D.device()
    tok = assets.load_tokenizer(REF)
    batches, vocab = corpus_batches(tok, T, B, a.steps + 1)
    rss0 = rss_mib()
    t0 = time.perf_counter()
    enc = OnlineFeatures(REF, a.layer, cfg.encoder.dtype, device, training_dtype(sa.train.precision, device))
    load_s = time.perf_counter() - t0
    rss_enc = rss_mib()
    H = int(enc.encoder.backbone.config.hidden_size)
    for b in batches:  # stored features: what preprocess would have written (same function, fp16)
        b["features"] = enc(b["tokens"]).cpu()
    print(f"device {device} ({torch.get_num_threads()} threads), compute {training_dtype(sa.train.precision, device)}; "
          f"encoder SmolLM2-135M layer {a.layer} ({sum(p.numel() for p in enc.encoder.parameters()) / 1e6:.1f}M "
          f"params kept, hidden {H}; loaded in {load_s:.1f} s), features stored as {cfg.encoder.dtype}")
    print(f"Stage A at the demo shape: B {B}, T {T}, d {sa.latent_dim}, {sa.flow.layers} couplings x {sa.flow.hidden}, "
          f"decoder {sa.decoder.width}x{sa.decoder.depth}, compact vocab {vocab}; ZeRO-{sa.train.zero_stage}")

    task = BenchTask(sa, H, vocab, T)
    task.encoder = enc
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(sa.train, task, Loader(), tmp, run=RunConfig(progress=False), stage="bench")

        def step(b: dict, online: bool) -> float:
            batch = {k: v.to(device) for k, v in b.items()}
            batch["online"] = online
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            loss, _ = trainer.engine(batch, trainer.step, "train")
            trainer.engine.backward(loss)
            trainer.engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t

        def encoder_only(b: dict) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            enc(b["tokens"])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t

        step(batches[0], False), step(batches[0], True), encoder_only(batches[0])  # warm-up
        stored, online, encode = [], [], []
        for b in batches[1:]:  # alternate: the same batch both ways, drift hits both alike
            stored.append(step(b, False))
            online.append(step(b, True))
            encode.append(encoder_only(b))
        trainer.close()
    ts, to, te = (statistics.median(x) for x in (stored, online, encode))
    print(f"step with stored features: {ts:.3f} s; with the online encoder: {to:.3f} s  ->  online / stored "
          f"= {to / ts:.2f}x")
    print(f"encoder forward alone on the same batch: {te:.3f} s = {te / to:.0%} of the online step "
          f"(step-time difference / online step: {(to - ts) / to:.0%})")
    tokens = T * (4 + 1)  # int32 tokens + uint8 mask per position
    feats = T * H * {"float16": 2, "bfloat16": 2, "float32": 4}[cfg.encoder.dtype]
    print(f"peak RSS: {rss0:.0f} MiB before the encoder, {rss_enc:.0f} MiB after loading it, {rss_mib():.0f} MiB at "
          f"the end; disk per sample (raw): {tokens + feats} B with stored features vs {tokens} B token-only "
          f"({(tokens + feats) / tokens:.0f}x)")
    D.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

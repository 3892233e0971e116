"""Stage A training step at the paper's shapes, through the real Trainer's DeepSpeed engine.

    python tools/bench_stage_a.py [--batch 4] [--steps 3] [--seq 128] [--latent 256] [--couplings 12]
                                  [--hidden 1024] [--features 896] [--vocab 151936] [--zero 2]

Prints, from ONE run (so the ratios compare like with like on this machine):
- step time of the Trainer's engine step (forward + backward + ZeRO step) and of the same model
  stepped with plain PyTorch AdamW (no DeepSpeed): the overhead ratio;
- achieved model FLOP/s (the model's own FLOP count) and its fraction of this machine's dense
  fp32 (or bf16 on CUDA) GEMM FLOP/s, measured in this run;
- peak memory (max RSS on CPU; max allocated on CUDA).
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

from coupling_dist.components import dist as D  # noqa: E402
from coupling_dist.components.metrics import measure_gemm_flops  # noqa: E402
from coupling_dist.components.trainer import Trainer  # noqa: E402
from coupling_dist.config import DecoderConfig, FlowConfig, RunConfig, StageAConfig, TrainConfig  # noqa: E402
from coupling_dist.models.stage_a import StageAModel  # noqa: E402


class SyntheticLoader:
    """Random features/tokens with realistic padding (lengths T/2..T), deterministic per step."""

    def __init__(self, batch: int, seq: int, feat: int, vocab: int):
        self.batch, self.seq, self.feat, self.vocab, self.step = batch, seq, feat, vocab, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.step)
            lengths = torch.randint(self.seq // 2, self.seq + 1, (self.batch,), generator=g)
            mask = (torch.arange(self.seq)[None] < lengths[:, None]).to(torch.uint8)
            self.step += 1
            yield {"features": torch.randn(self.batch, self.seq, self.feat, generator=g).half(),
                   "tokens": torch.randint(0, self.vocab, (self.batch, self.seq), generator=g, dtype=torch.int32),
                   "mask": mask}

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, s):
        self.step = s["step"]


class BenchTask:
    def __init__(self, cfg: StageAConfig, feat: int, vocab: int, seq: int):
        self.cfg, self.feat, self.vocab, self.seq = cfg, feat, vocab, seq
        self.model = None

    def build_model(self):
        self.model = StageAModel(self.feat, self.vocab, self.cfg)
        return self.model

    def loss(self, model, batch, step):
        return model.loss(batch["features"], batch["tokens"], batch["mask"], step)

    def eval_metrics(self, model, batch):
        return {}

    def flops_per_sample(self):
        return {"stage_a": self.model.flops_per_sample(self.seq)}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, steps: int, device) -> list[float]:
    fn()  # warm-up (allocator, first-call costs)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--latent", type=int, default=256)
    p.add_argument("--couplings", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--features", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dec-width", type=int, default=512)
    p.add_argument("--dec-depth", type=int, default=2)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--skip-plain", action="store_true", help="skip the plain-PyTorch baseline")
    a = p.parse_args()
    D.init_distributed()
    device = D.device()
    cfg = StageAConfig(latent_dim=a.latent, flow=FlowConfig(layers=a.couplings, hidden=a.hidden, depth=1, heads=a.heads),
                       decoder=DecoderConfig(width=a.dec_width, depth=2 if a.dec_depth is None else a.dec_depth,
                                             heads=8, ffn=4 * a.dec_width),
                       train=TrainConfig(steps=1000, batch_size=a.batch, warmup_steps=0, zero_stage=a.zero,
                                         resume="none", peak_flops=1.0))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemm = measure_gemm_flops(device, dtype, use_cache=False)
    print(f"device: {device} ({torch.get_num_threads()} threads), dtype {dtype}, measured GEMM {gemm / 1e9:.1f} GFLOP/s")

    task = BenchTask(cfg, a.features, a.vocab, a.seq)
    loader = SyntheticLoader(a.batch, a.seq, a.features, a.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg.train, task, loader, tmp, run=RunConfig(progress=False), stage="bench")
        n_params = sum(p.numel() for p in task.model.parameters())
        flops = task.flops_per_sample()["stage_a"] * a.batch
        it = iter(loader)

        def ds_step():
            batch = {k: v.to(device) for k, v in next(it).items()}
            loss, _ = trainer.engine(batch, trainer.step, "train")
            trainer.engine.backward(loss)
            trainer.engine.step()

        ds = time_steps(ds_step, a.steps, device)
        mem_ds = peak_memory_gb(device)
        trainer.close()
    ds_t = statistics.median(ds)
    print(f"shapes: B {a.batch}, T {a.seq}, d {a.latent}, {a.couplings} couplings x hidden {a.hidden}, "
          f"features {a.features}, vocab {a.vocab}, decoder {a.dec_width}x{a.dec_depth}; {n_params / 1e6:.1f}M params")
    print(f"model FLOPs per step: {flops / 1e12:.3f} TFLOP")
    print(f"DeepSpeed ZeRO-{a.zero} step: {ds_t:.3f} s  ->  {flops / ds_t / 1e9:.1f} GFLOP/s achieved = "
          f"{flops / ds_t / gemm:.3f} of measured GEMM peak; tokens/s {a.batch * a.seq / ds_t:.0f}; "
          f"peak memory {mem_ds:.2f} GiB")
    if not a.skip_plain:
        torch.manual_seed(0)
        model = StageAModel(a.features, a.vocab, cfg).to(device)
        if dtype == torch.bfloat16:
            model = model.to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer builds it
        it2 = iter(SyntheticLoader(a.batch, a.seq, a.features, a.vocab))

        def plain_step():
            b = {k: v.to(device) for k, v in next(it2).items()}
            loss, _ = model.loss(b["features"], b["tokens"], b["mask"], 0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        pl_t = statistics.median(time_steps(plain_step, a.steps, device))
        print(f"plain PyTorch step: {pl_t:.3f} s  ->  {flops / pl_t / gemm:.3f} of GEMM peak; "
              f"DeepSpeed/plain step-time ratio {ds_t / pl_t:.2f}")
    D.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m coupling_dist.plan --config FILE [--samples N] [--gpus G --peak-flops F --mfu M] [overrides]``:
the whole run's plan as two tables -- bytes per artifact, FLOPs and wall-clock per stage -- from the
config alone (``planning.run_plan``: no weights loaded, nothing written). Not a pipeline stage."""
from __future__ import annotations

import argparse

from ...config import Config
from ...planning.run_plan import Plan, build_plan
from ...planning.storage import human


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=None,
                   help="plan for N corpus sentences (needed when the corpus is not on this machine)")
    p.add_argument("--gpus", type=int, default=None, help="accelerators the run uses (wall-clock = FLOPs / "
                   "(gpus x peak x mfu)); given: checkpoints are planned in bf16 under precision auto")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s per accelerator (H100 SXM dense bf16: 989e12); default: train.peak_flops")
    p.add_argument("--mfu", type=float, default=0.4, help="model-FLOP utilisation assumed (default 0.4)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan, gpus: int, peak: float | None, mfu: float) -> str:
    out = [f"plan for {plan.config}: {plan.samples:,} samples, seq_len {plan.seq_len}, precision auto = "
           f"{plan.precision}"]
    out += [f"  - {n}" for n in plan.notes]
    out += ["", f"{'stage':<11} {'artifact':<22} {'bytes':>10} {'peak':>10}  path"]
    for a in plan.artifacts:
        peak_b = human(a.peak) if a.peak and a.peak != a.bytes else ""
        out.append(f"{a.stage:<11} {a.name:<22} {human(a.bytes):>10} {peak_b:>10}  {a.path}")
        if a.note:
            out.append(f"{'':<11}   {a.note}")
    total = sum(a.bytes for a in plan.artifacts)
    out.append(f"{'total':<11} {'(at the end)':<22} {human(total):>10}")
    out.append("")
    rate = None if peak is None else gpus * peak * mfu
    head = f"{'stage':<11} {'FLOPs':>9}"
    if rate:
        head += f" {'wall-clock':>11} {'GPU-hours':>10}"
    out.append(head + "  what")
    for c in plan.compute:
        row = f"{c.stage:<11} {c.flops:>9.2e}"
        if rate:
            row += f" {_duration(c.flops / rate):>11} {c.flops / (peak * mfu) / 3600:>10.1f}"
        out.append(row + f"  {c.note}")
    flops = sum(c.flops for c in plan.compute)
    row = f"{'total':<11} {flops:>9.2e}"
    if rate:
        row += f" {_duration(flops / rate):>11} {flops / (peak * mfu) / 3600:>10.1f}"
    out.append(row)
    if rate:
        out.append(f"wall-clock on {gpus} accelerator(s) x {peak:.3g} FLOP/s peak at MFU {mfu:g}; GPU-hours = "
                   f"FLOPs / (peak x MFU) / 3600")
    else:
        out.append("no wall-clock: pass --peak-flops (or set train.peak_flops) and --gpus")
    return "\n".join(out)


def main(cfg: Config, args: argparse.Namespace) -> int:
    import torch

    accelerator = args.gpus is not None or torch.cuda.is_available()
    plan = build_plan(cfg, args.config or "<defaults>", args.samples, accelerator)
    peak = args.peak_flops or cfg.stage_a.train.peak_flops or cfg.stage_b.train.peak_flops
    print(format_plan(plan, args.gpus or 1, peak, args.mfu), flush=True)
    return 0

"""``python -m coupling_dist.pipeline --config FILE [overrides]``: every stage, in order.

preprocess -> stage_a -> pair_store -> stage_b -> sample -> evaluate. Each stage runs as its own
process (clean torch.distributed / DeepSpeed / Ray state per stage), launched the way
``pipeline.launcher`` says: locally, under torchrun with ``pipeline.nproc`` ranks, or as an
``srun`` step inside a SLURM allocation. A stage whose ``_COMPLETE.json`` marker exists is skipped;
an interrupted stage has no marker and resumes from its own checkpoints / finished shards.
Run as a Ray job (``ray job submit -- python -m coupling_dist.pipeline``), every stage is a plain
child process that inherits the job's cluster: preprocess and evaluate schedule their actor pools,
and the rank-based stages run ``ray.num_workers`` Ray-actor ranks (``components.ray_launch``).
At the end a summary table lists status, wall time, key metrics and outputs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

from ...components import paths
from ...components.preflight import check_writable
from ...config import Config, load_config

DIST_STAGES = {"stage_a", "pair_store", "stage_b", "sample"}
OUTPUTS = {  # what each stage leaves for users
    "preprocess": lambda c: os.path.join(paths.data_dir(c), "manifest.json"),
    "stage_a": paths.stage_a_export,
    "pair_store": lambda c: os.path.join(paths.pair_store_dir(c), "manifest.json"),
    "stage_b": paths.generator_export,
    "sample": paths.samples_file,
    "evaluate": paths.eval_results,  # run.dir/eval/
}


def resolve_launcher(cfg: Config) -> str:
    if cfg.pipeline.launcher != "auto":
        return cfg.pipeline.launcher
    from ...components.ray_launch import under_ray_job

    if under_ray_job():  # each stage process is a Ray driver and places its own ranks (ray_launch)
        return "local"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "srun"
    return "torchrun" if cfg.pipeline.nproc > 1 else "local"


def stage_command(stage: str, cfg: Config, config_path: Optional[str], overrides: list[str]) -> list[str]:
    args = ["-m", f"coupling_dist.{stage}"]
    if config_path:
        args += ["--config", config_path]
    args += overrides
    launcher = resolve_launcher(cfg)
    if stage not in DIST_STAGES or launcher == "local":
        return [sys.executable, *args]
    if launcher == "srun":
        ntasks = os.environ.get("SLURM_NTASKS", str(cfg.pipeline.nproc))
        return ["srun", f"--ntasks={ntasks}", "--kill-on-bad-exit=1", sys.executable, *args]
    from ...components.dist import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.pipeline.nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]


def _key_metrics(summary: dict, limit: int = 3) -> str:
    items = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


def print_table(rows: list[dict]) -> None:
    header = ("stage", "status", "wall_s", "key metrics", "output")
    table = [header] + [(r["stage"], r["status"], f"{r['wall_s']:.1f}", r["metrics"], r["output"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    line = "-+-".join("-" * w for w in widths)
    print("\n" + line)
    for i, row in enumerate(table):
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print(line)
    print(line, flush=True)


def main(config_path: Optional[str], overrides: list[str]) -> int:
    """Run the configured stages in order; returns the exit status (config errors raise, see ``cli``)."""
    cfg = load_config(config_path, overrides)
    check_writable(cfg.run.dir, "run.dir")
    rows: list[dict] = []
    child: dict = {}

    def forward(signum, _frame):  # preemption: let the running stage checkpoint and exit
        p = child.get("proc")
        if p is not None and p.poll() is None:
            p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    status = 0
    for stage in cfg.pipeline.stages:
        out = OUTPUTS[stage](cfg)
        done = paths.read_completion(cfg, stage)
        if done is not None:
            rows.append(dict(stage=stage, status="skipped (complete)", wall_s=0.0,
                             metrics=_key_metrics(done.get("summary", {})), output=out))
            print(f"[pipeline] {stage}: already complete, skipping", flush=True)
            continue
        cmd = stage_command(stage, cfg, config_path, overrides)
        print(f"[pipeline] {stage}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        child["proc"] = subprocess.Popen(cmd)
        rc = child["proc"].wait()
        child["proc"] = None
        wall = time.time() - t0
        done = paths.read_completion(cfg, stage) if rc == 0 else None
        if rc != 0 or done is None:
            rows.append(dict(stage=stage, status=f"FAILED (exit {rc})", wall_s=wall, metrics="", output=out))
            status = rc or 1
            break
        rows.append(dict(stage=stage, status="done", wall_s=wall, metrics=_key_metrics(done.get("summary", {})),
                         output=out))
    print_table(rows)
    if status == 0:
        ev = paths.stage_dir(cfg, "evaluate")
        print(f"samples:        {OUTPUTS['sample'](cfg)}")
        print(f"metrics table:  {os.path.join(ev, 'results.csv')}")
        print(f"frontier plot:  {os.path.join(ev, 'frontier.png')}")
    return status

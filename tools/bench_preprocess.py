"""Preprocessing throughput: Ray with 1 and 2 workers vs a plain single-process loop doing the same work.

    python tools/bench_preprocess.py [--sentences 1024] [--seq-len 32] [--shard-size 128] [--encoder tiny:qwen2]

The same shard tasks (real Lee sentences, real Qwen tokenizer, the configured frozen encoder,
zstd shard writes) are run (a) by one in-process ``ShardWorker`` in a plain loop and (b) through
``preprocess(cfg)`` on a local Ray instance with 1 and 2 actors (one intra-op thread per worker
everywhere, so the comparison is per-core). Ray is started once before timing; the timed Ray runs
include actor start-up (model load), which a real run pays once. Printed: sentences/s and ratios
to the plain loop, end to end and in steady state (work only, excluding actor start-up).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coupling_dist.config import load_config  # noqa: E402
from coupling_dist.data.shard_job import PARTS, sidecar_path  # noqa: E402
from coupling_dist.stages.preprocess import plan as P  # noqa: E402
from coupling_dist.stages.preprocess.work import preprocess  # noqa: E402
from coupling_dist.stages.preprocess.worker import ShardWorker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--encoder", default="tiny:qwen2", help="'none' for tokens only")
    a = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["OMP_NUM_THREADS"] = "1"
    import ray
    import torch

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench_pp.")
    enc = None if a.encoder == "none" else a.encoder

    def cfg_for(name, workers):
        return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [
            f"run.dir={tmp}/{name}", "run.progress=false", "run.wandb.mode=disabled", f"data.seq_len={a.seq_len}",
            f"data.shard_size={a.shard_size}", f"data.max_samples={a.sentences}", f"encoder.model={enc or 'null'}",
            f"ray.num_workers={workers}", "ray.num_cpus_per_worker=1"])

    # (a) the plain loop: same tasks, same worker code, one process
    cfg = cfg_for("plain", 1)
    settings = P.build_settings(cfg)
    n = P.count_samples(settings["files"], cfg)
    plan, held = P.make_plan(n, cfg.data.heldout_fraction, cfg.data.shard_size, P.fingerprint(settings))
    out = cfg.data_dir
    os.makedirs(os.path.join(out, PARTS))
    t0 = time.perf_counter()
    w = ShardWorker(cfg.data.tokenizer, cfg.data.seq_len, out,
                    {"model": enc, "layer": -1, "dtype": "float16", "batch_size": cfg.encoder.batch_size}, 1)
    t_ready = time.perf_counter()
    for task in P.iter_tasks(settings["files"], cfg, held, plan, {e["name"] for e in plan}):
        w.process(task)
    t1 = time.perf_counter()
    rows = [("plain loop (1 process)", n / (t1 - t0), n / (t1 - t_ready))]

    from coupling_dist.components.ray_launch import init_ray

    init_ray(None, 2)
    try:
        for workers in (1, 2):
            cfg = cfg_for(f"ray{workers}", workers)
            t0 = time.perf_counter()
            preprocess(cfg)
            wall = time.perf_counter() - t0
            recs = [json.load(open(sidecar_path(cfg.data_dir, e["name"]))) for e in plan]
            # steady state: the workers' busy time, spread over the workers (they run in parallel)
            busy = sum(r["seconds"] for r in recs) / workers
            rows.append((f"Ray, {workers} worker(s)", n / wall, n / busy))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    base_e2e, base_ss = rows[0][1], rows[0][2]
    print(f"\npreprocess: {n} sentences, seq_len {a.seq_len}, encoder {enc}, shard_size {a.shard_size}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'setup':<26}{'end-to-end sent/s':>19}{'ratio':>8}{'steady sent/s':>15}{'ratio':>8}")
    for name, e2e, ss in rows:
        print(f"{name:<26}{e2e:>19.1f}{e2e / base_e2e:>8.2f}{ss:>15.1f}{ss / base_ss:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

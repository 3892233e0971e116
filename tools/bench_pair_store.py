"""Pair-store throughput and size: pairs/s with 1 and 2 ranks, bytes per pair with and without zstd.

    python tools/bench_pair_store.py [--shape demo|paper] [--samples N] [--launcher torchrun|ray]
                                     [--device cpu|cuda] [--keep DIR]

Both runs are the real entry (``python -m coupling_dist.pair_store``) in real processes: torchrun
with 1 and 2 ranks (or ``pair_store.ray_workers`` Ray-actor ranks), on the same inputs: synthetic
source shards in the real format and a freshly initialised Stage A exported as a real artifact
(tools/pair_store_fixtures.py; an untrained Stage A costs the same to run as a trained one).

Shapes: ``demo`` is configs/tiny.yaml's Stage A (T 32, features 64 = tiny Qwen2 width, d 16,
RealNVP 4 layers hidden 64, Qwen vocab); ``paper`` is configs/lm1b_paper.yaml's Stage A (T 128,
features 896 = Qwen2.5-0.5B width, d 256, RealNVP 12 layers hidden 1024 depth 2) on fewer samples.

Printed: pairs/s of the encode phase (all pairs / the slowest rank's own work seconds, which
leave out process start, model load and the report) and the whole command's wall time, for each
rank count, with the 2-rank/1-rank speedup; whether both stores are byte-identical; bytes per
pair on disk (zstd members, as written) and uncompressed (the same tar with raw ``.npy``
members), per field and in total, with the compression ratio. Each rank runs one thread
(OMP_NUM_THREADS=1), so 2 ranks use 2 cores where 1 rank uses one. A work unit is one source
shard, so the 2-rank balance depends on their number (demo: 16 train + 1 held-out shard).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coupling_dist.config import load_config  # noqa: E402
from coupling_dist.data import shards as S  # noqa: E402

QWEN_VOCAB = 151_669  # the tokenizer's vocabulary (what preprocess records)
SHAPES = {
    "demo": dict(config="configs/tiny.yaml", T=32, H=64, samples=4096, shard=256, held=64),
    "paper": dict(config="configs/lm1b_paper.yaml", T=128, H=896, samples=48, shard=6, held=8),
}


def build_inputs(root: str, shape: dict, n: int, V: int) -> tuple[str, str]:
    from pair_store_fixtures import export_random_stage_a, make_source

    data = os.path.join(root, "data")
    make_source(data, n_train=n, n_heldout=shape["held"], shard_size=shape["shard"], T=shape["T"], H=shape["H"], V=V)
    sa = load_config(os.path.join(ROOT, shape["config"]), []).stage_a
    return data, export_random_stage_a(os.path.join(root, "stage_a_export"), data, sa)


def run_entry(nproc: int, launcher: str, args: list[str], env: dict) -> float:
    from coupling_dist.components.dist import free_port

    if launcher == "ray":
        cmd = [sys.executable, "-m", "coupling_dist.pair_store", *args, f"pair_store.ray_workers={nproc}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "coupling_dist.pair_store", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pair_store with {nproc} rank(s) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall


def sizes(out_dir: str) -> dict:
    """Bytes per field (zstd member vs its .npy), and whole-tar totals as written and as they would be
    with raw .npy members (same tar layout, so the headers count in both)."""
    man = S.Manifest.load(out_dir)
    per = {}
    disk_total = raw_total = pairs = 0
    for s in man.shards:
        path = os.path.join(out_dir, s["name"])
        disk_total += os.path.getsize(path)
        pairs += int(s["count"])
        buf = io.BytesIO()
        with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
            for m in src.getmembers():
                comp = src.extractfile(m).read()
                npy = io.BytesIO()  # the member as it would be without zstd
                np.save(npy, S.decode_array(comp, path, m.name), allow_pickle=False)
                p = per.setdefault(m.name.split(".")[1], [0, 0])
                p[0] += len(comp)
                p[1] += npy.tell()
                ti = tarfile.TarInfo(m.name[:-len(".zst")])
                ti.size = npy.tell()
                npy.seek(0)
                dst.addfile(ti, npy)
        raw_total += len(buf.getvalue())
    return {"pairs": pairs, "disk": disk_total, "raw": raw_total, "fields": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--samples", type=int, default=None, help="train samples (default: demo 4096, paper 48)")
    ap.add_argument("--launcher", choices=("torchrun", "ray"), default="torchrun")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--multiplicity", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=QWEN_VOCAB, help="tokenizer vocabulary (decoder head of Stage A)")
    ap.add_argument("--keep", default=None, help="work dir to keep (default: a temp dir, removed)")
    a = ap.parse_args()
    shape = SHAPES[a.shape]
    n = a.samples or shape["samples"]
    root = a.keep or tempfile.mkdtemp(prefix="bench_pair_store.")
    os.makedirs(root, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data, art = build_inputs(root, shape, n, a.vocab)
        print(f"inputs: {n} + {shape['held']} held-out samples, T {shape['T']}, features {shape['H']}, "
              f"Stage A {shape['config']} ({time.perf_counter() - t0:.1f} s to build)")
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
                   RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        rows, outs = [], {}
        for nproc in (1, 2):
            run_dir = os.path.join(root, f"run{nproc}")
            args = ["--config", os.path.join(ROOT, shape["config"]), f"run.dir={run_dir}", f"data.out_dir={data}",
                    f"pair_store.artifact={art}", f"pair_store.multiplicity={a.multiplicity}", "pair_store.dtype=float16",
                    "pair_store.report_samples=512", f"pair_store.device={a.device}", "run.wandb.mode=disabled",
                    "run.progress=false", "ray.num_cpus_per_worker=1", "ray.num_gpus_per_worker=0"]
            wall = run_entry(nproc, a.launcher, args, env)
            with open(os.path.join(run_dir, "pair_store", "_COMPLETE.json"), encoding="utf-8") as fh:
                ranks = json.load(fh)["summary"]["ranks"]
            pairs = sum(r["samples"] for r in ranks)
            work = max(r["seconds"] for r in ranks)
            rows.append((nproc, pairs, work, pairs / work, wall))
            outs[nproc] = os.path.join(run_dir, "pair_store")
        same = ({s["name"]: s["sha256"] for s in S.Manifest.load(outs[1]).shards}
                == {s["name"]: s["sha256"] for s in S.Manifest.load(outs[2]).shards})
        print(f"\nthroughput ({a.launcher}, {a.device}, K {a.multiplicity}, float16 z, 1 thread per rank)")
        print(f"  {'ranks':>5}  {'pairs':>6}  {'work s':>8}  {'pairs/s':>9}  {'wall s':>7}")
        for nproc, pairs, work, rate, wall in rows:
            print(f"  {nproc:>5}  {pairs:>6}  {work:>8.2f}  {rate:>9.3g}  {wall:>7.1f}")
        print(f"  speedup 2 ranks / 1 rank: {rows[1][3] / rows[0][3]:.2f}x (encode phase), "
              f"{rows[0][4] / rows[1][4]:.2f}x (wall); stores byte-identical: {'yes' if same else 'NO'}")
        sz = sizes(outs[1])
        P = sz["pairs"]
        print(f"\nbytes per pair ({P} pairs)")
        print(f"  {'field':>9}  {'raw .npy':>9}  {'zstd':>9}  {'ratio':>6}")
        for fld, (comp, npy) in sorted(sz["fields"].items()):
            print(f"  {fld:>9}  {npy / P:>9.1f}  {comp / P:>9.1f}  {npy / comp:>5.2f}x")
        comp_all, npy_all = (sum(v[i] for v in sz["fields"].values()) for i in (0, 1))
        print(f"  {'members':>9}  {npy_all / P:>9.1f}  {comp_all / P:>9.1f}  {npy_all / comp_all:>5.2f}x")
        print(f"  {'tar total':>9}  {sz['raw'] / P:>9.1f}  {sz['disk'] / P:>9.1f}  {sz['raw'] / sz['disk']:>5.2f}x"
              f"   (whole shard files incl. tar headers; zstd level {S.ZSTD_LEVEL})")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

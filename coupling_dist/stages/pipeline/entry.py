"""``python -m coupling_dist.pipeline --config FILE [overrides]``: every stage, in order.

preprocess -> stage_a -> pair_store -> stage_b -> sample -> evaluate (``pipeline.stages``; a
guidance run adds ``classifier`` and ``finetune`` after stage_b, ``config.ALL_STAGES``). Each stage runs as its own
process (clean torch.distributed / DeepSpeed / Ray state per stage), launched the way
``pipeline.launcher`` says: locally, under torchrun with ``pipeline.nproc`` ranks, or as an
``srun`` step inside a SLURM allocation.

A stage whose ``_COMPLETE.json`` marker exists is skipped while the marker's provenance still
matches (``components.provenance``: its inputs -- upstream stages by their markers' fingerprints --
its config keys, its outputs); otherwise it re-runs, and so, through the fingerprints, does
everything downstream of it, the log saying why. ``--force STAGE`` re-runs a stage and its
dependents on purpose. A re-run first moves the stage's directory aside to
``<dir>.stale-<time>`` (never deleted), so it cannot resume from checkpoints made from the old
inputs. An interrupted stage has no marker and resumes from its own checkpoints / finished shards,
unless it was started from other inputs (then it is moved aside too).

One pipeline per run.dir at a time (``components.run_lock``: the second exits with 2 naming the
holder); each stage process locks its stage. SIGTERM / SIGINT / SIGHUP / SIGUSR1 are forwarded to
the running stage and the pipeline waits for it (then starts nothing further, except after USR1
-- a preemption -- where the stage's own exit status decides); if the pipeline is killed outright
the stage gets SIGTERM (Linux parent-death signal), so it never runs on as an orphan.
Run as a Ray job (``ray job submit -- python -m coupling_dist.pipeline``), every stage is a plain
child process that inherits the job's cluster: preprocess and evaluate schedule their actor pools,
and the rank-based stages run ``ray.num_workers`` Ray-actor ranks (``components.ray_launch``).
At the end a summary table lists status, wall time, key metrics and outputs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from ...components import paths, provenance, run_lock
from ...components.preflight import check_writable
from ...config import Config, ConfigError, load_config
from ...domains import build_domain

DIST_STAGES = {"stage_a", "pair_store", "stage_b", "finetune", "sample"}
OUTPUTS = {  # what each stage leaves for users
    "preprocess": lambda c: os.path.join(paths.data_dir(c), "manifest.json"),
    "stage_a": paths.stage_a_export,
    "pair_store": lambda c: os.path.join(paths.pair_store_dir(c), "manifest.json"),
    "stage_b": paths.generator_export,
    "classifier": paths.reward_classifier,
    "finetune": paths.finetune_export,
    "sample": paths.samples_file,
    "evaluate": paths.eval_results,  # run.dir/eval/results.json
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


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the pipeline dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def split_force(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--force STAGE`` / ``--force=STAGE`` (repeatable) out of the command line: (stages, the rest)."""
    force, rest, it = [], [], iter(argv)
    for a in it:
        if a == "--force":
            force.append(next(it, ""))
        elif a.startswith("--force="):
            force.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    return force, rest


def final_outputs(cfg: Config, written: list[str]) -> list[tuple[str, str]]:
    """(label, path) of the outputs of the stages in ``written`` (ran, or found complete, in this run):
    with a restricted ``pipeline.stages`` nothing is listed that this run did not make."""
    ev = paths.stage_dir(cfg, "evaluate")
    # the domain's pictures of its samples (binary images: grid.png, real.png) and its evaluation's files
    pics = ((paths.read_completion(cfg, "sample") or {}).get("summary") or {}).get("pictures") or []
    table = [("preprocess", "shard set", OUTPUTS["preprocess"](cfg)), ("stage_a", "Stage A export", OUTPUTS["stage_a"](cfg)),
             ("pair_store", "pair store", OUTPUTS["pair_store"](cfg)), ("stage_b", "generator", OUTPUTS["stage_b"](cfg)),
             ("sample", "samples", OUTPUTS["sample"](cfg))] + [("sample", "sample picture", p) for p in pics]
    table += [("evaluate", label, os.path.join(ev, name)) for label, name in build_domain(cfg).eval_outputs]
    return [(label, path) for stage, label, path in table if stage in written]


def main(config_path: Optional[str], overrides: list[str], force: tuple = ()) -> int:
    """Run the configured stages in order; returns the exit status (config errors raise, see ``cli``).
    ``force``: stages to re-run, with everything downstream of them, although complete."""
    cfg = load_config(config_path, overrides)
    check_writable(cfg.run.dir, "run.dir")
    stages = list(cfg.pipeline.stages)
    for s in force:
        if s not in stages:
            raise ConfigError(f"--force {s!r}: not one of the stages this pipeline runs (pipeline.stages = {stages})")
    lock = run_lock.pipeline_lock(cfg).acquire()  # a second pipeline on this run.dir: exit 2, naming us
    forced: dict = {}
    for s in force:
        for d in provenance.dependents(cfg, s, stages):
            forced.setdefault(d, s)
    rows: list[dict] = []
    child: dict = {}

    def forward(signum, _frame):  # the running stage gets the signal (preemption: it checkpoints) and we wait for it
        if signum != signal.SIGUSR1:
            child["stop"] = signum  # start no further stage
        p = child.get("proc")
        if p is not None and p.poll() is None:
            p.send_signal(signum)
        elif signum != signal.SIGUSR1:
            raise SystemExit(128 + signum)  # between stages: nothing to wait for

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)
    status = 0
    try:
        status = _run_stages(cfg, stages, forced, config_path, overrides, rows, child)
    finally:
        lock.release()
    print_table(rows)
    written = [r["stage"] for r in rows if r["status"] == "done" or r["status"].startswith("skipped")]
    if written:
        outs = final_outputs(cfg, written)
        width = max((len(label) for label, _ in outs), default=0) + 2
        for label, path in outs:
            print(f"{label + ':':<{width}}{path}")
        print_results(cfg, written)
    return status


def print_results(cfg: Config, written: list[str], n_samples: int = 5) -> None:
    """What the run generated, at a glance: a few samples and the evaluation's rows."""
    samples = OUTPUTS["sample"](cfg)
    if "sample" in written and os.path.isfile(samples):
        with open(samples, encoding="utf-8") as fh:
            recs = [json.loads(line) for line, _ in zip(fh, range(n_samples))]
        if all("text" in r for r in recs):  # text; other domains' samples are pictured (sample pictures above)
            print(f"\nfirst {len(recs)} samples ({samples}):")
            for r in recs:
                print(f"  {r['text'][:160]!r}")
    results = OUTPUTS["evaluate"](cfg)
    if "evaluate" in written and os.path.isfile(results):
        with open(results, encoding="utf-8") as fh:
            doc = json.load(fh)
        rows = doc.get("rows", [])
        if doc.get("metric") == "classifier_frechet":  # the domain's metric (stages/evaluate/classifier_frechet.py)
            what, (k1, h1, f1), (k2, h2) = "classifier features", ("fd_classifier", "FD", "10.2f"), ("confidence", "conf.")
        else:
            what, (k1, h1, f1), (k2, h2) = f"scorer {cfg.evaluate.scorer}", ("gen_ppl", "Gen-PPL", "10.1f"), ("entropy", "entropy")
        more = [(k, h) for k, h in build_domain(cfg).summary_columns if k in doc.get("domain_columns", [])]
        print(f"\nevaluation ({results}; {what}):")
        print(f"  {'series':<32} {'kind':<10} {h1:>10} {h2:>8}" + "".join(f" {h:>10}" for _, h in more))
        for r in rows:
            v1, v2 = r.get(k1), r.get(k2)
            v1 = format(v1, f1) if isinstance(v1, (int, float)) else f"{'-':>10}"
            v2 = f"{v2:8.3f}" if isinstance(v2, (int, float)) else f"{'-':>8}"
            v3 = "".join(f" {r[k]:10.2e}" if isinstance(r.get(k), (int, float)) else f" {'-':>10}" for k, _ in more)
            print(f"  {str(r.get('name'))[:32]:<32} {str(r.get('kind')):<10} {v1} {v2}{v3}")


def _run_stages(cfg, stages, forced, config_path, overrides, rows, child) -> int:
    for stage in stages:
        if child.get("stop"):
            rows.append(dict(stage=stage, status="not run (stopped)", wall_s=0.0, metrics="", output="-"))
            continue
        out = OUTPUTS[stage](cfg)
        done = paths.read_completion(cfg, stage)
        if stage in forced:
            reason = f"forced (--force {forced[stage]})"
        else:
            reason = provenance.stale_reason(cfg, stage, done)
        if done is not None and reason is None:
            rows.append(dict(stage=stage, status="skipped (complete)", wall_s=0.0,
                             metrics=_key_metrics(done.get("summary", {})), output=out))
            note = "" if done.get("provenance") else " (its marker predates input fingerprints: not checked; --force re-runs it)"
            print(f"[pipeline] {stage}: already complete, skipping{note}", flush=True)
            continue
        if reason is not None:
            print(f"[pipeline] {stage}: re-running, {reason}", flush=True)
            try:
                with run_lock.stage_lock(cfg, stage):  # nobody may be writing there while it moves
                    moves = provenance.move_aside(cfg, stage)
            except run_lock.RunLockError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                rows.append(dict(stage=stage, status="FAILED (in use)", wall_s=0.0, metrics="", output="-"))
                return 2
            for src, dst in moves:
                print(f"[pipeline] {stage}: moved the previous {src} aside to {dst} (nothing deleted; remove it "
                      f"when no longer needed)", flush=True)
        cmd = stage_command(stage, cfg, config_path, overrides)
        print(f"[pipeline] {stage}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        child["proc"] = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
        rc = child["proc"].wait()  # a signal meanwhile is forwarded to it (above) and the wait goes on
        child["proc"] = None
        rc = 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128 + N
        wall = time.time() - t0
        done = paths.read_completion(cfg, stage) if rc == 0 else None
        if rc != 0 or done is None:
            rows.append(dict(stage=stage, status=f"FAILED (exit {rc})", wall_s=wall, metrics="", output="-"))
            if child.get("stop"):
                print(f"[pipeline] {stage}: stopped by signal {child['stop']} (exit {rc})", flush=True)
            return rc or 1
        rows.append(dict(stage=stage, status="done", wall_s=wall, metrics=_key_metrics(done.get("summary", {})),
                         output=out))
    return 128 + child["stop"] if child.get("stop") else 0


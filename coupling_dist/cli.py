"""What every entry module shares: argument parsing, config loading, pre-flight checks, logging.

An entry is ``python -m coupling_dist.<stage> --config FILE [dotted.key=value ...]``; it calls
``run_entry("stage", fn)`` where ``fn(cfg) -> dict`` does the work and returns a short summary.
Config errors and pre-flight failures exit with status 2 before any work, naming the key or path.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

from .config import Config, ConfigError, load_config

MIN_FREE_BYTES = int(float(os.environ.get("COUPLING_DIST_MIN_FREE_MB", "200")) * 2**20)


class PreflightError(RuntimeError):
    pass


def parse_args(stage: str, argv: Optional[list[str]] = None) -> tuple[Optional[str], list[str]]:
    p = argparse.ArgumentParser(prog=f"python -m coupling_dist.{stage}",
                                description=f"coupling_dist {stage}: see README.md")
    p.add_argument("--config", default=None, help="YAML run config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. run.dir=runs/x")
    a = p.parse_args(argv)
    path = a.config
    if path is None:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
        path = here if os.path.isfile(here) else None
    return path, a.overrides


def check_writable(path: str, what: str = "run.dir") -> None:
    """Fail at start, not after an hour: the output dir must be creatable, writable, with free space."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.write(fd, b"x" * 4096)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PreflightError(f"{what} '{path}' is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise PreflightError(f"{what} '{path}' has only {free / 2**20:.0f} MiB free "
                             f"(need at least {MIN_FREE_BYTES / 2**20:.0f} MiB; COUPLING_DIST_MIN_FREE_MB)")


def load(stage: str, argv: Optional[list[str]] = None) -> Config:
    path, overrides = parse_args(stage, argv)
    cfg = load_config(path, overrides)
    check_writable(cfg.stage_dir(stage), f"run.dir ({cfg.run.dir}) for stage '{stage}'")
    return cfg


COMPLETE = "_COMPLETE.json"


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def completion_marker(cfg: Config, stage: str) -> str:
    return os.path.join(cfg.stage_dir(stage), COMPLETE)


def read_completion(cfg: Config, stage: str) -> Optional[dict]:
    path = completion_marker(cfg, stage)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def exit_on_peer_failure(fn: Callable, *args):
    """``fn(*args)``; if a peer rank died (``dist.PeerFailure``), print the message and leave at
    once with status 1: interpreter shutdown would tear down a process group whose peer is gone,
    which can block, and every checkpoint on disk is already complete (atomic writes)."""
    from .components.dist import PeerFailure

    try:
        return fn(*args)
    except PeerFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def run_entry(stage: str, fn: Callable[[Config], Optional[dict]], argv: Optional[list[str]] = None) -> int:
    """Run one stage. The stage's ``_COMPLETE.json`` marker (read by the pipeline to skip finished
    stages) is removed when the stage starts and written by rank 0 only after ``fn`` returned on
    every rank, so an interrupted or failed stage is never marked complete."""
    try:
        cfg = load(stage, argv)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    marker = completion_marker(cfg, stage)
    if _is_rank0() and os.path.exists(marker):
        os.remove(marker)
    t0 = time.time()
    try:
        summary = exit_on_peer_failure(fn, cfg)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        _leave_process_group(barrier=False, exit_code=e.code)
        raise
    if _is_rank0():
        from .data.shards import write_json_atomic

        write_json_atomic(marker, {"stage": stage, "summary": summary or {}, "wall_s": round(time.time() - t0, 2),
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": cfg.to_dict()})
    _leave_process_group(barrier=True)
    return 0


def _leave_process_group(barrier: bool, exit_code=0) -> None:
    """Destroy the process group before the interpreter exits. Left to interpreter teardown, gloo's
    worker threads can abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489), which srun/torchrun report as a failed task after a run that finished.
    Only on the paths where every rank gets here (success, or a preemption exit: every rank
    checkpointed and leaves at the same step); after an error a peer may still be inside a
    collective, and destroying could block (torchtitan#1342). The barrier lets no rank leave
    before rank 0 has written the completion marker."""
    if "torch" not in sys.modules:  # a driver (Ray) or a config error: no process group here
        return
    from .components import dist as D

    if exit_code != 0 and exit_code not in D.PREEMPT_EXIT_CODES:
        return
    if barrier:
        D.barrier()
    D.shutdown()

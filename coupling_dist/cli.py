"""What every entry module shares: argument parsing, config loading, pre-flight checks, logging.

An entry is ``python -m coupling_dist.<stage> --config FILE [dotted.key=value ...]``; it calls
``run_entry("stage", fn)`` where ``fn(cfg) -> dict`` does the work and returns a short summary.
Config errors and pre-flight failures exit with status 2 before any work, naming the key or path.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
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


def run_entry(stage: str, fn: Callable[[Config], Optional[dict]], argv: Optional[list[str]] = None) -> int:
    try:
        cfg = load(stage, argv)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fn(cfg)
    return 0

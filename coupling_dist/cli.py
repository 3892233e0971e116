"""The command-line layer: what every ``python -m coupling_dist.<entry>`` shares.

An entry is ``python -m coupling_dist.<stage> --config FILE [dotted.key=value ...]``; its shim calls
``run_entry("stage", main)`` where ``main(cfg) -> dict`` (``stages/<stage>/entry.py``) does the work
and returns a short summary. Config errors and errors in the user's inputs (``ConfigError``;
``components.preflight.InputError``, which includes ``PreflightError``: a bad corpus line, shard,
checkpoint, export or samples file, whenever it is found) become one ``error: ...`` line naming the
file and the fix, and exit status 2; ``--debug`` (or ``COUPLING_DIST_DEBUG=1``, which ``--debug``
sets for child processes and Ray actors too) adds the traceback. The pipeline's shim calls
``run_driver`` (it launches the stages as child processes and returns their status); the planner's
``run_tool`` (a config in, a table out: nothing written, no lock, no marker).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Callable, Optional

from .components import paths, provenance, run_lock
from .components.atomic import write_json
from .components.preflight import DEBUG_ENV, InputError, check_writable, debug_enabled
from .config import Config, ConfigError, load_config

USER_ERRORS = (ConfigError, InputError)  # exit status 2, one line (PreflightError is an InputError)


def report_error(e: BaseException) -> int:
    """One ``error: ...`` line on stderr (after the traceback with ``--debug``); returns 2."""
    if debug_enabled():
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


def parse_args(stage: str, argv: Optional[list[str]] = None) -> tuple[Optional[str], list[str]]:
    a = _parse(stage, argv)
    return a.config, a.overrides


def _parse(stage: str, argv: Optional[list[str]] = None,
           add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m coupling_dist.{stage}",
                                description=f"coupling_dist {stage}: see README.md")
    p.add_argument("--config", default=None, help="YAML run config (default: configs/demo.yaml)")
    p.add_argument("--debug", action="store_true",
                   help=f"print the traceback of an error exit (also: {DEBUG_ENV}=1)")
    if add_arguments is not None:  # an entry's own options (the planner's --gpus ...)
        add_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. run.dir=runs/x")
    a = p.parse_args(argv)
    if a.debug:  # the environment carries it to child stages, torchrun ranks and Ray actors
        os.environ[DEBUG_ENV] = "1"
    if a.config is None:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
        a.config = here if os.path.isfile(here) else None
    return a


def load(stage: str, argv: Optional[list[str]] = None) -> Config:
    path, overrides = parse_args(stage, argv)
    cfg = load_config(path, overrides)
    check_writable(paths.stage_dir(cfg, stage), f"run.dir ({cfg.run.dir}) for stage '{stage}'")
    return cfg


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _is_rank0() -> bool:
    return _rank() == 0


def run_entry(stage: str, fn: Callable[[Config], Optional[dict]], argv: Optional[list[str]] = None) -> int:
    """Run one stage. The stage's ``_COMPLETE.json`` marker (read by the pipeline to skip finished
    stages) is removed when the stage starts and written by rank 0 only after ``fn`` returned on
    every rank, so an interrupted or failed stage is never marked complete. Each rank first takes
    its lock on the stage (``components.run_lock``: a second run of the stage on the same run.dir
    exits with 2 naming the holder); rank 0 records the stage's inputs and config at the start and
    writes them, with its outputs' identity, into the marker (``components.provenance``)."""
    lock = None
    try:
        cfg = load(stage, argv)
        lock = run_lock.stage_lock(cfg, stage, _rank()).acquire()
        started = provenance.begin(cfg, stage) if _is_rank0() else None
    except USER_ERRORS as e:
        if lock is not None:
            lock.release()
        return report_error(e)
    marker = paths.completion_marker(cfg, stage)
    if _is_rank0() and os.path.exists(marker):
        os.remove(marker)
    from .components import dist as D  # imports torch: after the config checks, which need none

    t0 = time.time()
    try:
        summary = D.exit_on_peer_failure(fn, cfg)
    except USER_ERRORS as e:
        D.mark_failed()  # the process group (if any) is left alone at exit: see components.dist
        return report_error(e)
    except SystemExit as e:  # a preemption exit (every rank checkpointed) is a clean exit
        if e.code not in (0, None) and e.code not in D.PREEMPT_EXIT_CODES:
            D.mark_failed()
        elif isinstance(e.code, int) or e.code is None:
            D.set_exit_status(e.code or 0)
        raise
    if _is_rank0():
        write_json(marker, {"stage": stage, "summary": summary or {}, "wall_s": round(time.time() - t0, 2),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": cfg.to_dict(),
                            "provenance": provenance.complete(cfg, stage, started)})
    D.shutdown(wait_all=True)  # no rank leaves before rank 0 wrote the marker
    lock.release()
    D.set_exit_status(0)
    return 0


def run_driver(name: str, fn: Callable[[Optional[str], list[str]], int], argv: Optional[list[str]] = None) -> int:
    """``fn(config_path, overrides) -> exit status`` (the pipeline); config errors exit with 2."""
    path, overrides = parse_args(name, argv)
    try:
        return fn(path, overrides)
    except USER_ERRORS as e:
        return report_error(e)


def run_tool(name: str, fn: Callable[[Config, argparse.Namespace], int],
             add_arguments: Callable[[argparse.ArgumentParser], None], argv: Optional[list[str]] = None) -> int:
    """An entry that reads a config and writes nothing (``plan``): no lock, no completion marker, no
    run.dir check; ``fn(cfg, args) -> exit status``; user errors exit with 2 as everywhere."""
    a = _parse(name, argv, add_arguments)
    try:
        return fn(load_config(a.config, a.overrides), a)
    except USER_ERRORS as e:
        return report_error(e)

"""Test-only fault injection: one environment variable, no effect unless it is set.

    COUPLING_DIST_FAULT="<point>:<key>=<value>[,<key>=<value>...]"

Production code marks a few places with ``faults.point("<point>", key=value, ...)``. A point fires
when the variable names it and every ``key=value`` of the spec equals (as text) what the site
passes; the process then SIGKILLs itself (a real crash: no cleanup, no exception handlers). The
reserved key ``once=<path>`` fires only while ``<path>`` does not exist (it is created just before
firing), so that a retried task succeeds. The reserved key ``error=<name>`` (``enospc``, ``eio``,
``eacces``) raises that ``OSError`` instead of dying -- what a write that hits a full disk raises
-- naming the site's ``path``. The launcher forwards the variable to Ray actors
(``components.ray_launch``).

Points: ``preprocess.shard`` (shard), ``pair_store.unit`` (rank, done = units this rank finished),
``evaluate.batch`` (batch), ``stage_b.step`` (step, rank), ``checkpoint.write`` (step, rank; after
DeepSpeed wrote its files into ``step_N.tmp``, before our trainer state; path).
"""
from __future__ import annotations

import errno
import os
import signal

ENV = "COUPLING_DIST_FAULT"
ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "eacces": errno.EACCES}


def spec(point_name: str, **keys) -> str:
    """The variable's value for ``point_name`` with ``keys`` (what tests set)."""
    return point_name + ":" + ",".join(f"{k}={v}" for k, v in keys.items())


def point(name: str, **ctx) -> None:
    raw = os.environ.get(ENV)
    if not raw:
        return
    where, _, body = raw.partition(":")
    if where != name:
        return
    want = dict(item.split("=", 1) for item in body.split(",") if item)
    once = want.pop("once", None)
    error = want.pop("error", None)
    if any(str(ctx.get(k)) != v for k, v in want.items()):
        return
    if once is not None:
        if os.path.exists(once):
            return
        open(once, "w").close()
    if error is not None:
        code = ERRORS[error]
        raise OSError(code, os.strerror(code), ctx.get("path"))
    os.kill(os.getpid(), signal.SIGKILL)

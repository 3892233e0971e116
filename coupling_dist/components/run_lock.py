"""Advisory locks on a run.dir: two pipelines, or two runs of one stage, never write into the same
place at the same time.

``run.dir/.locks/<name>.lock`` is held with ``fcntl.flock`` (exclusive, non-blocking) for as long
as the holder lives and names it (host, pid, what, since). A second taker fails at once with
``RunLockError`` (a ``PreflightError``: exit status 2) naming the holder. The kernel drops a flock
when its holder dies, however it dies, so a lock file left by a dead process is simply taken over
(a note on stderr says whose it was). The files live outside the stage directories, which the pipeline
may move aside while a stage is locked.

Names: ``pipeline`` (the pipeline driver, for its whole run) and one per stage. A stage with several
ranks (torchrun, srun) takes one lock per rank, ``<stage>.lock`` for rank 0 / the single process
and ``<stage>.rank<R>.lock`` for rank R: the ranks of one job never conflict, and every rank of a
second job on the same stage fails before any work. Ray-actor ranks do not run the entry: their
driver holds the stage's lock.

Over NFS, flock is emulated with POSIX byte-range locks (Linux >= 2.6.12): it works across hosts
when the server supports locking; the lock is advisory either way.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from typing import Optional

from .preflight import PreflightError
LOCK_DIR = ".locks"


class RunLockError(PreflightError):
    """Another live process holds the lock."""


def lock_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, LOCK_DIR, f"{name}.lock")


class RunLock:
    """An exclusive flock on ``path``; ``acquire`` raises ``RunLockError`` naming the holder."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_fd(fd) or "an unknown process"
            os.close(fd)
            raise RunLockError(f"{self.what} is in use: {self.path} is held by {holder}. Wait for it to finish or "
                               f"stop it (the lock is released when its holder exits), or use another run.dir") from None
        old = _read_fd(fd)
        if old:  # its holder died without releasing it (a clean release empties the file)
            print(f"note: taking over {self.path}, left by a process that is gone ({old})", file=sys.stderr, flush=True)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, describe_self(self.what).encode())
        os.fsync(fd)
        os.set_inheritable(fd, False)  # child processes must not keep the lock alive after we exit
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty file: nobody to name
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_self(what: str) -> str:
    return f"host {socket.gethostname()} pid {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def stage_lock(cfg, stage: str, rank: int = 0) -> RunLock:
    """The (not yet acquired) lock of one rank of ``stage`` in ``cfg.run.dir``."""
    name = stage if rank == 0 else f"{stage}.rank{rank}"
    what = f"stage {stage} of run.dir {cfg.run.dir}" + (f" (rank {rank})" if rank else "")
    return RunLock(lock_path(cfg.run.dir, name), what)


def pipeline_lock(cfg) -> RunLock:
    return RunLock(lock_path(cfg.run.dir, "pipeline"), f"the pipeline of run.dir {cfg.run.dir}")

"""torch.distributed set-up shared by every entry, whatever launched it.

Launchers and how we read them:
- plain process: world 1 (a process group is still created, on a free loopback port, so DeepSpeed
  and collectives work unchanged);
- torchrun / Ray workers: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master address is MASTER_ADDR when the batch
  script exported it, else the first node of the allocation (``scontrol show hostnames``), taking
  its ``NodeAddr`` (simulated or unresolvable node names are common); the port is MASTER_PORT or
  derived from the job id.
Backend: NCCL when CUDA is available, gloo otherwise. The collective timeout is bounded
(``COUPLING_DIST_TIMEOUT_S``, default 300 s) so that a dead peer ends a job with an error rather
than a silent hang.

Teardown is registered where the group is created (``init_distributed``), so every process that
creates one -- entries, test workers, Ray actor ranks, benchmarks, a user's own script around the
Trainer -- leaves it the same way. Left to interpreter teardown, gloo's worker threads can abort
the process after a run that finished ("terminate called without an active exception",
pytorch/pytorch#190489), which srun/torchrun report as a failed task. So an ``atexit`` handler
destroys the group -- but only on a clean exit: after an error a peer may still be inside a
collective, and destroying could block (torchtitan#1342). "Clean" means no uncaught exception
(an ``excepthook`` wrapper notices one) and no ``mark_failed()`` (the CLI calls it for an error
exit status); a preemption exit is clean (every rank checkpointed and leaves at the same step).
With a single rank there is no peer to wait for, so the group is always destroyed. ``shutdown()``
destroys it at once (with a barrier when every rank must have reached the same point first).
Destroying the group does not free the backend while other objects (DeepSpeed's engine, its
groups) still reference it, and the abort was still seen (rarely) after a destroyed group. So a
rank of a multi-rank group that knows its exit status (``set_exit_status``: the CLI's entries and
the test workers call it) and exits cleanly leaves with ``os._exit`` right after the teardown, its
streams and log handlers flushed: interpreter finalization, where the abort happens, never runs.
"""
from __future__ import annotations

import atexit
import datetime
import os
import signal
import socket
import subprocess
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist


# Preemption: the Trainer checkpoints on these signals and the process ends with the shell's
# "ended by signal N" status (128 + N), which SLURM requeue scripts and launchers recognise.
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_code_for(signum: int) -> int:
    """Shell convention for 'ended by signal N': 143 for SIGTERM, 138 for SIGUSR1."""
    return 128 + int(signum)


PREEMPT_EXIT_CODES = frozenset(exit_code_for(s) for s in PREEMPT_SIGNALS)


class PeerFailure(RuntimeError):
    """A collective failed because another rank died or became unreachable."""


# How gloo / NCCL / the c10d store word a lost peer (they raise plain RuntimeErrors / DistErrors).
_PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
               "socket", "nccl", "gloo", "connection refused", "store")


def is_peer_failure(e: BaseException) -> bool:
    if isinstance(e, PeerFailure) or isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _PEER_SIGNS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    out = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith("NodeAddr="):
            return tok.split("=", 1)[1]
    return first


def launch_env() -> dict:
    """Rank layout from the environment (does not initialise anything)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return dict(rank=int(env["RANK"]), world=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                    launcher=env.get("COUPLING_DIST_LAUNCHER", "torchrun"))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return dict(rank=int(env["SLURM_PROCID"]), world=int(env["SLURM_NTASKS"]),
                    local_rank=int(env.get("SLURM_LOCALID", 0)), launcher="srun")
    return dict(rank=0, world=1, local_rank=0, launcher="single")


def init_distributed(timeout_s: Optional[float] = None) -> dict:
    """Initialise the default process group once; return the layout dict."""
    info = launch_env()
    if dist.is_available() and dist.is_initialized():
        return info
    if info["launcher"] == "srun":
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    elif info["launcher"] == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.update(RANK=str(info["rank"]), WORLD_SIZE=str(info["world"]), LOCAL_RANK=str(info["local_rank"]),
                      LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
    timeout = timeout_s if timeout_s is not None else float(os.environ.get("COUPLING_DIST_TIMEOUT_S", "300"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(info["local_rank"] % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if cuda else "gloo", rank=info["rank"], world_size=info["world"],
                            timeout=datetime.timedelta(seconds=timeout))
    _register_teardown()
    return info


# --------------------------------------------------------------------------- teardown

_EXIT = {"registered": False, "failed": False, "pid": None, "status": None, "multi": False}


def mark_failed() -> None:
    """This process is ending after an error: leave the process group to the OS at exit."""
    _EXIT["failed"] = True


def set_exit_status(code: int) -> None:
    """This process is about to exit with ``code`` (module docstring: a clean multi-rank exit then
    skips interpreter finalization)."""
    _EXIT["status"] = int(code)


def _register_teardown() -> None:
    _EXIT["multi"] = _EXIT["multi"] or dist.get_world_size() > 1
    if _EXIT["registered"]:
        return
    _EXIT.update(registered=True, pid=os.getpid())
    previous = sys.excepthook

    def hook(kind, value, tb):  # an uncaught exception: not a clean exit
        mark_failed()
        previous(kind, value, tb)

    sys.excepthook = hook
    atexit.register(_teardown_at_exit)


def _teardown_at_exit() -> None:
    if os.getpid() != _EXIT["pid"]:  # a forked child inherited the handler, not the group
        return
    if _EXIT["failed"] and _EXIT["multi"]:
        return
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- at exit, nothing left to report to
            return
    if _EXIT["multi"] and _EXIT["status"] is not None:  # clean, status known: skip finalization
        import logging

        logging.shutdown()  # flushes and closes every handler (the run's log files)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(_EXIT["status"])


def shutdown(wait_all: bool = False) -> None:
    """Destroy the process group now (a no-op without one); ``wait_all``: first a barrier, so that no
    rank leaves before every rank got here (e.g. before rank 0 wrote a completion marker)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_all:
        barrier()
    dist.destroy_process_group()


def exit_on_peer_failure(fn: Callable, *args):
    """``fn(*args)``; if a peer rank died (``PeerFailure``), print the message and leave at once with
    status 1: interpreter shutdown would tear down a process group whose peer is gone, which can
    block, and every checkpoint on disk is already complete (atomic writes)."""
    try:
        return fn(*args)
    except PeerFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a group of > 1)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ok(ok: bool) -> bool:
    """True only if every rank says ok (used before marking anything complete)."""
    if world_size() == 1:
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item()) == 0


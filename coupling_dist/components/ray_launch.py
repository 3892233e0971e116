"""Ray, shared by every entry: connecting, and running a stage's ranks as Ray actors.

Two uses:
- data-parallel work pools (preprocess encoders, evaluation scorers) call ``init_ray`` and then
  schedule their own actors;
- rank-based stages (stage_a, pair_store, stage_b, sample) run unchanged as torch.distributed
  ranks inside Ray actors: ``launch_ranks(cfg, fn, world)`` reserves a placement group (one bundle
  per rank: ``ray.num_cpus_per_worker`` CPUs and ``ray.num_gpus_per_worker`` GPUs), starts one
  actor per bundle, hands each RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, runs ``fn(cfg)``
  and returns the rank summaries. The work itself is the same function torchrun and srun run.

When does an entry become a Ray driver? ``ray_world``: when it was started as a single process
(not by torchrun/srun) and either the stage's ``ray_workers`` is set, or the process is a Ray job
driver (``ray job submit ... -- python -m coupling_dist.<stage>``: the job supervisor sets
``RAY_JOB_CONFIG_JSON_ENV_VAR``), in which case it uses ``ray.num_workers`` ranks.

Connection: ``ray.address``, else ``RAY_ADDRESS`` (set for job drivers), else a private local
instance bound to 127.0.0.1 (``address="local"``: never attach to another user's cluster found in
/tmp/ray).
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
from typing import Callable, Optional

from . import dist as D
from .faults import ENV as FAULT_ENV
from .logging import get_logger
from .preflight import DEBUG_ENV, InputError, debug_enabled

LOG = get_logger("ray")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Environment that actors need to behave like the driver (offline hub, caches, test fault injection).
FORWARDED_ENV = ("COUPLING_DIST_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM",
                 "COUPLING_DIST_TIMEOUT_S", "COUPLING_DIST_MIN_FREE_MB", FAULT_ENV, DEBUG_ENV)
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env(threads: int = 1) -> dict:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(max(1, threads)), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


def init_ray(address: Optional[str] = None, num_cpus: Optional[float] = None, *, log_to_driver: bool = False,
             threads: int = 1) -> bool:
    """Connect or start Ray; True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    renv = {"env_vars": worker_env(threads)}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        LOG.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=renv, log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ncpu = max(1, math.ceil(num_cpus or 1))
        ray.init(address="local", num_cpus=ncpu, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=renv, log_to_driver=log_to_driver)
        LOG.info("started a local Ray instance on 127.0.0.1 (%d CPUs)", ncpu)
    return True


def under_ray_job() -> bool:
    return bool(os.environ.get(JOB_ENV))


def ray_world(cfg, explicit: Optional[int]) -> Optional[int]:
    """Ranks to run as Ray actors, or None when this process should do the work itself."""
    if D.launch_env()["launcher"] != "single":
        return None  # torchrun / srun / a Ray actor already made the ranks
    if explicit:
        return int(explicit)
    return int(cfg.ray.num_workers) if under_ray_job() else None


class _RankActor:
    """One rank; methods run in the actor process."""

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), D.free_port()

    def run(self, fn: Callable, cfg, rank: int, world: int, addr: str, port: int, threads: int) -> dict:
        import torch

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=addr, MASTER_PORT=str(port), COUPLING_DIST_LAUNCHER="ray")
        torch.set_num_threads(max(1, threads))
        tb = None
        try:
            out = {"rank": rank, "status": 0, "summary": fn(cfg)}
        except SystemExit as e:  # preemption (checkpointed: 143/138) or a stage's own exit status
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            ok = code == 0 or code in D.PREEMPT_EXIT_CODES
            out = {"rank": rank, "status": code, "summary": None, "error": None if ok else str(e)}
        except InputError as e:  # the user's inputs (PreflightError included): one line, status 2
            out = {"rank": rank, "status": 2, "summary": None, "error": str(e), "input_error": True}
            tb = traceback.format_exc()
        except Exception as e:  # noqa: BLE001 -- reported with the rank, the job exits non-zero
            out = {"rank": rank, "status": 1, "summary": None, "error": f"{type(e).__name__}: {e}"}
            tb = traceback.format_exc()
        if tb and debug_enabled():  # --debug / COUPLING_DIST_DEBUG=1 (forwarded to the actors)
            out["traceback"] = tb
        # The actor process outlives this call (the driver kills it, so no atexit handler runs):
        # leave the group here, by the same rule as dist's exit handler (after an error a peer may
        # still be inside a collective; the group then goes with the process).
        if out["status"] == 0 or out["status"] in D.PREEMPT_EXIT_CODES or world == 1:
            D.shutdown()
        return out


def report_rank_errors(bad: list[dict], stage: str) -> None:
    """The failed ranks' errors on stderr. An input error (the user's file, shard, checkpoint...) is
    the cause of everything else that went wrong in that run (peers that lost it, ...): then only
    it is printed, once -- ``error: <message>``, as a single process would -- however many ranks
    hit it. Tracebacks (``--debug``) come first."""
    inputs = [r for r in bad if r.get("input_error")]
    shown = inputs or [r for r in bad if r.get("error")]
    for r in shown:
        if r.get("traceback"):
            print(f"rank {r['rank']}:\n{r['traceback']}", file=sys.stderr)
    seen: dict[str, list[int]] = {}
    for r in shown:
        seen.setdefault(r["error"], []).append(r["rank"])
    for msg, ranks in seen.items():
        if inputs:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        else:
            print(f"error ({stage}, rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}): {msg}",
                  file=sys.stderr, flush=True)


def _collect(refs: list, actors: list) -> list[dict]:
    """Every rank's result, in rank order. A rank that returned a failure (an input error, an
    exception) still holds its process and its end of the process group, so peers waiting for it
    in a collective would wait for the collective timeout: its actor is killed at once, which they
    notice as a lost peer. Should they still not finish, they are stopped (killed, reported as
    stopped) ``COUPLING_DIST_RAY_GRACE_S`` (default 60 s) later. A rank whose process died needs
    neither: its peers notice by themselves."""
    import ray

    pending = {ref: r for r, ref in enumerate(refs)}
    out: dict[int, dict] = {}
    deadline = None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        if not ready:  # the grace period after a failure is over
            for r in pending.values():
                out[r] = {"rank": r, "status": 1, "summary": None, "error": None, "stopped": True}
            break
        r = pending.pop(ready[0])
        try:
            res = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:  # the worker process or its node died
            out[r] = {"rank": r, "status": 1, "summary": None, "error": f"Ray worker died: {e}"}
            continue
        out[r] = res
        if res["status"] != 0 and res["status"] not in D.PREEMPT_EXIT_CODES and pending:
            ray.kill(actors[r])  # its peers see the closed connection instead of waiting
            if deadline is None:
                deadline = time.monotonic() + float(os.environ.get("COUPLING_DIST_RAY_GRACE_S", "60"))
    return [out[r] for r in range(len(refs))]


def launch_ranks(cfg, fn: Callable, world: int, stage: str) -> list[dict]:
    """Run ``fn(cfg)`` as ``world`` torch.distributed ranks in Ray actors; raise SystemExit with the
    worst rank status when any rank failed (so ``ray job submit`` reports the failure)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rc = cfg.ray
    threads = max(1, int(rc.num_cpus_per_worker))
    started = init_ray(rc.address, world * rc.num_cpus_per_worker, log_to_driver=True, threads=threads)
    bundle = {"CPU": rc.num_cpus_per_worker}
    if rc.num_gpus_per_worker:
        bundle["GPU"] = rc.num_gpus_per_worker
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    timeout = float(os.environ.get("COUPLING_DIST_RAY_PG_TIMEOUT_S", "300"))
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise SystemExit(f"error: {stage}: the Ray cluster could not place {world} workers of {bundle} within "
                         f"{timeout:.0f} s (cluster resources: {ray.cluster_resources()}); lower ray.num_workers "
                         f"or the per-worker resources") from None
    Actor = ray.remote(_RankActor)
    actors = [Actor.options(num_cpus=rc.num_cpus_per_worker, num_gpus=rc.num_gpus_per_worker,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
              .remote() for i in range(world)]
    t0 = time.perf_counter()
    try:
        addr, port = ray.get(actors[0].address.remote())
        LOG.info("%s: %d Ray workers (%s each), master %s:%d", stage, world, bundle, addr, port)
        refs = [a.run.remote(fn, cfg, r, world, addr, port, threads) for r, a in enumerate(actors)]
        results = _collect(refs, actors)
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)
        if started:
            ray.shutdown()
    bad = [r for r in results if r["status"] != 0]
    report_rank_errors(bad, stage)
    if bad:
        raise SystemExit(max(r["status"] for r in bad))
    LOG.info("%s: Ray workers finished in %.1f s", stage, time.perf_counter() - t0)
    return results


def run_stage(cfg, fn: Callable, stage: str, explicit: Optional[int] = None,
              preflight: Optional[Callable[[int], object]] = None) -> dict:
    """The entry's ``main``: ``fn(cfg)`` here, or on Ray actors when ``ray_world`` says so
    (``preflight(world)`` then runs in the driver first: clear errors before reserving anything)."""
    world = ray_world(cfg, explicit)
    if world is None:
        return fn(cfg)
    if preflight is not None:
        preflight(world)
    results = launch_ranks(cfg, fn, world, stage)
    return dict(results[0]["summary"] or {}, launcher="ray", ray_workers=world)

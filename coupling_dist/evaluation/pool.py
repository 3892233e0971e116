"""A Ray actor pool that scores text with a causal LM.

- One actor per GPU when the Ray cluster has GPUs; otherwise ``num_actors`` CPU actors (one CPU
  and one intra-op thread each, so every actor computes the same kernels).
- Each actor loads the scorer once, in its constructor, and then serves many batches.
- The driver tokenizes, cuts chunks, sorts them by length and fixes the batches *before*
  scheduling (``scorer.ScoringPlan``); actors only run forward passes. Batches are handed out
  dynamically by the shared fault-tolerant pool (``components.ray_pool``: a dead actor is
  restarted and its batch retried), but results are keyed by batch id and summed in text order,
  so the metrics are identical whatever the number of actors or failures.
- ``ray.init``: to ``ray.address`` when given (an existing cluster, e.g. "auto" under
  ``ray job submit``), else a local instance bound to loopback.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

from ..components import faults
from ..components.logging import get_logger
from ..components.ray_pool import ActorPool
from .scorer import ScoringPlan, aggregate

log = get_logger("evaluate.pool")


class _ScorerActor:
    def __init__(self, scorer_ref: str, use_gpu: bool, threads: int):
        import torch

        from ..components.assets import load_causal_lm

        torch.set_num_threads(max(1, int(threads)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        self.model = load_causal_lm(scorer_ref, self.device)
        self.load_seconds = time.perf_counter() - t0
        self.calls = 0

    def info(self) -> dict:
        from .scorer import context_length

        return {"pid": os.getpid(), "device": self.device, "load_seconds": self.load_seconds, "calls": self.calls,
                "context": context_length(self.model)}

    def ping(self) -> int:
        return os.getpid()

    def score(self, batch_id: int, chunks: list, eos_id: int, protocol: str):
        from .scorer import score_chunk_batch

        self.calls += 1
        faults.point("evaluate.batch", batch=batch_id)
        return batch_id, score_chunk_batch(self.model, chunks, eos_id, protocol, self.device)


class ScorerPool:
    """``with ScorerPool(ref, num_actors) as pool: metrics = pool.score(texts, ids, tok, protocol)``."""

    def __init__(self, scorer_ref: str, num_actors: int = 2, address: Optional[str] = None,
                 cpus_per_actor: float = 1.0, max_retries: int = 3):
        import ray

        from ..components.ray_launch import init_ray

        started = init_ray(address, num_actors * cpus_per_actor)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.use_gpu = gpus > 0
        n = gpus if self.use_gpu else int(num_actors)
        opts = {"num_gpus": 1, "num_cpus": cpus_per_actor} if self.use_gpu else {"num_cpus": cpus_per_actor}
        self.pool = ActorPool(_ScorerActor, (scorer_ref, self.use_gpu, max(1, int(cpus_per_actor))), n, options=opts,
                              max_retries=max_retries, owns_ray=started)
        self.info = self.pool.call_all("info")  # waits for every model load
        log.info("scorer pool: %d %s actor(s) loaded '%s'", n, "GPU" if self.use_gpu else "CPU", scorer_ref)
        self.max_len = int(self.info[0]["context"])

    @property
    def num_actors(self) -> int:
        return len(self.pool)

    def run_plan(self, plan: ScoringPlan) -> list[dict]:
        results = {}
        for _, (batch_id, res) in self.pool.map_unordered(
                "score", plan.batch_payloads(), args=lambda p: (p[0], p[1], plan.eos_id, plan.protocol),
                label=lambda p: f"scoring batch {p[0]}"):
            results[batch_id] = res
        return plan.per_text(results)

    def score(self, texts: Sequence[str], gen_ids, tok, protocol: str = "mdlm", batch_size: int = 16) -> dict:
        gen_ids = gen_ids if gen_ids is not None else [None] * len(texts)
        plan = ScoringPlan(texts, gen_ids, tok, protocol, self.max_len, batch_size)
        t0 = time.perf_counter()
        per_text = self.run_plan(plan)
        out = aggregate(per_text, protocol)
        out["score_seconds"] = time.perf_counter() - t0
        out["num_actors"] = self.num_actors
        return out

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

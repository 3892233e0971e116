"""The one fault-tolerant Ray actor pool (preprocessing encoders, evaluation scorers).

``ActorPool(cls, args, n, options=..., max_retries=R)`` starts ``n`` actors of ``cls`` (each builds
its model once, in its constructor, and then serves many tasks; ``cls`` needs a ``ping()``
method). ``map_unordered(method, tasks, args)`` streams ``tasks`` through them -- at most
``2 n`` in flight, so a driver that produces tasks lazily holds only that many -- and yields
``(task, result)`` as results arrive. A task that fails (an exception, or its actor died: a crash,
a lost node) is resubmitted, up to ``R`` times, then ``RayPoolError`` names it. A dead actor is
restarted by Ray (``max_restarts=R``: its constructor runs again) or, once that is used up or it
stays unreachable, replaced. A task that raised an ``InputError`` (bad input: retrying cannot help)
is not retried; the error is re-raised as itself, so the entry prints its one line (exit status 2). Callers key results by task, so the outcome never depends on which
actor ran what, or how often.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from .logging import get_logger
from .preflight import InputError

LOG = get_logger("ray_pool")


class RayPoolError(RuntimeError):
    pass


class ActorPool:
    def __init__(self, cls: type, args: tuple, n: int, *, options: dict, max_retries: int,
                 owns_ray: bool = False, revive_timeout_s: float = 300.0):
        import ray

        self.max_retries, self.owns_ray, self.revive_timeout_s = int(max_retries), owns_ray, revive_timeout_s
        self._cls = ray.remote(cls).options(max_restarts=self.max_retries, max_task_retries=0, **options)
        self._args = args
        self.actors = [self._cls.remote(*args) for _ in range(max(1, int(n)))]

    def __len__(self) -> int:
        return len(self.actors)

    def call_all(self, method: str, *args) -> list:
        """``method(*args)`` on every actor; waits for all (e.g. the model loads)."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def _revive(self, a: int) -> None:
        """Wait until actor ``a`` serves again (Ray restarts it up to max_retries times); past that,
        or if it stays unreachable, replace it."""
        import ray

        t_end = time.monotonic() + self.revive_timeout_s
        while time.monotonic() < t_end:
            try:
                ray.get(self.actors[a].ping.remote(), timeout=self.revive_timeout_s)
                return
            except ray.exceptions.ActorUnavailableError:  # restarting: its constructor is running
                time.sleep(0.5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                LOG.warning("worker %d is gone; starting a replacement", a)
                self.actors[a] = self._cls.remote(*self._args)
        raise RayPoolError(f"Ray worker {a} did not come back within {self.revive_timeout_s:.0f}s")

    def map_unordered(self, method: str, tasks: Iterable, args: Callable[[object], tuple] = lambda t: (t,),
                      label: Callable[[object], str] = str) -> Iterator[tuple[object, object]]:
        """Yield ``(task, getattr(actor, method)(*args(task)))`` for every task, in completion order."""
        import ray

        n = len(self.actors)
        load = [0] * n
        inflight: dict = {}  # ref -> (actor index, task, attempt)
        it = iter(tasks)

        def submit(task, attempt: int) -> None:
            a = min(range(n), key=lambda k: load[k])
            load[a] += 1
            inflight[getattr(self.actors[a], method).remote(*args(task))] = (a, task, attempt)

        exhausted = False
        while True:
            while not exhausted and len(inflight) < 2 * n:
                task = next(it, _END)
                if task is _END:
                    exhausted = True
                else:
                    submit(task, 0)
            if not inflight:
                return
            ready, _ = ray.wait(list(inflight), num_returns=1)
            a, task, attempt = inflight.pop(ready[0])
            load[a] -= 1
            try:
                result = ray.get(ready[0])
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, InputError):  # a bad input stays bad: no retry, the same one line
                    raise cause.with_traceback(None) from None
                if attempt >= self.max_retries:
                    raise RayPoolError(f"{label(task)}: failed {attempt + 1} time(s) "
                                       f"(ray.max_retries={self.max_retries}): {e}") from None
                LOG.warning("%s: attempt %d failed (%s); retrying", label(task), attempt + 1, type(e).__name__)
                if isinstance(e, ray.exceptions.RayActorError):
                    self._revive(a)
                submit(task, attempt + 1)
                continue
            yield task, result

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


_END = object()

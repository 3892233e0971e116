"""Logging, progress and metrics shared by every entry.

- ``setup_logging``: human log lines on stderr (rank 0 at INFO, other ranks at WARNING) and a
  per-rank log file under the stage directory.
- ``MetricsLogger``: one structured JSON line per interval to ``<stage_dir>/metrics.jsonl`` (rank
  0), the same line on the log, and wandb (offline by default: ``run.wandb.mode``).
- ``progress``: a tqdm bar on rank 0 when ``run.progress`` is on, a no-op elsewhere.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Iterable, Optional

LOG = logging.getLogger("coupling_dist")


def setup_logging(stage_dir: Optional[str], rank: int = 0) -> logging.Logger:
    root = logging.getLogger("coupling_dist")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    root.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [%(levelname)s] [rank{rank}] %(name)s: %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    sh.setFormatter(fmt)
    root.addHandler(sh)
    if stage_dir:
        os.makedirs(stage_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(stage_dir, f"log.rank{rank}.txt"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    return root


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"coupling_dist.{name}")


class MetricsLogger:
    """Structured metrics: JSONL + log line + wandb, written by rank 0 only."""

    def __init__(self, stage_dir: str, stage: str, cfg=None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(stage_dir, "metrics.jsonl")
        self.log = get_logger(stage)
        self._wandb = None
        if enabled and cfg is not None and cfg.run.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            try:
                import wandb
            except ImportError:  # wandb is a declared dependency; absent only in stripped installs
                self.log.warning("wandb not installed: metrics go to %s only", self.path)
            else:
                self._wandb = wandb.init(project=cfg.run.wandb.project, entity=cfg.run.wandb.entity,
                                         name=f"{cfg.run.name}-{stage}", mode=cfg.run.wandb.mode,
                                         dir=stage_dir, config=cfg.to_dict(), reinit="finish_previous")

    def log_metrics(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({f"{prefix}{k}": (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("time",))
        self.log.info(shown)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, initial: int = 0):
    """A tqdm bar (rank 0, when enabled) or a silent pass-through with the same interface."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, mininterval=2.0,
                    file=sys.stderr)
    return _NoBar(iterable)


class _NoBar:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

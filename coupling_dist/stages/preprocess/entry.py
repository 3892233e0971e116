"""``python -m coupling_dist.preprocess``: corpus -> WebDataset+zstd shards + ``manifest.json`` at
``data.out_dir`` (default ``run.dir/data``), scheduled on Ray (``work.preprocess``)."""
from __future__ import annotations

from ...components.logging import setup_logging
from ...components.paths import stage_dir
from ...config import Config
from ...data.shards import Manifest
from .work import preprocess


def main(cfg: Config) -> dict:
    setup_logging(stage_dir(cfg, "preprocess"), 0)
    path = preprocess(cfg)
    man = Manifest.load(path)
    return {"manifest": path, "shards": len(man.shards), **{f"samples_{k}": v for k, v in man.splits.items()}}

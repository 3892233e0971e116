"""``python -m coupling_dist.preprocess --config FILE [dotted.key=value ...]``

Corpus -> tokenized (and optionally encoder-featurized) WebDataset shards + ``manifest.json`` at
``data.out_dir`` (default ``run.dir/data``), scheduled on Ray. Re-running completes only what is
missing. The work lives in ``coupling_dist.data.preprocess``; other stages call ``preprocess(cfg)``.
"""
from __future__ import annotations

from .cli import run_entry
from .components.logging import setup_logging
from .config import Config
from .data.preprocess import preprocess
from .data.shards import Manifest


def main(cfg: Config) -> dict:
    setup_logging(cfg.stage_dir("preprocess"), 0)
    path = preprocess(cfg)
    man = Manifest.load(path)
    return {"manifest": path, "shards": len(man.shards), **{f"samples_{k}": v for k, v in man.splits.items()}}


if __name__ == "__main__":
    raise SystemExit(run_entry("preprocess", main))

"""Small synthetic shard sets for the data-layer tests (real files in the real format, no Ray)."""
from __future__ import annotations

import os

import numpy as np

from coupling_dist.data import shards as S


def sample(index: int, T: int = 8, H: int = 4, dtype: str = "float16") -> dict:
    """Sample ``index``: its tokens encode the index, so a batch's contents prove which samples it holds."""
    rng = np.random.default_rng(index)
    length = 1 + index % T
    tokens = np.zeros(T, dtype=np.int32)
    tokens[:length] = index * 1000 + np.arange(length)
    mask = np.zeros(T, dtype=np.uint8)
    mask[:length] = 1
    feats = rng.standard_normal((T, H)).astype(np.float32)
    if dtype == "bfloat16":
        import torch

        feats = torch.from_numpy(feats).to(torch.bfloat16).view(torch.uint16).numpy()
    else:
        feats = feats.astype(dtype)
    return {"__key__": f"{index:09d}", "tokens": tokens, "mask": mask, "features": feats}


def make_shard_set(out_dir: str, n_train: int = 50, n_heldout: int = 6, shard_size: int = 8, T: int = 8,
                   H: int = 4, dtype: str = "float16") -> S.Manifest:
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    index = 0
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        for j in range(0, n, shard_size):
            samples = [sample(index + k, T, H, dtype) for k in range(min(shard_size, n - j))]
            index += len(samples)
            rec = S.write_shard(os.path.join(out_dir, S.shard_name(split, j // shard_size)), samples)
            rec.update(split=split, first_key=samples[0]["__key__"], last_key=samples[-1]["__key__"])
            shards.append(rec)
    man = S.Manifest(kind="preprocess", seq_len=T, shards=shards,
                     fields={"tokens": {"dtype": "int32", "shape": [T]}, "mask": {"dtype": "uint8", "shape": [T]},
                             "features": {"dtype": dtype, "shape": [T, H]}},
                     tokenizer={"name": "synthetic", "vocab_size": 100_000, "hash": "x"})
    man.save(out_dir)
    return man

"""Tokenize (the domain's item codec) + encode + write one preprocessing shard per call. Runs as a Ray actor in the shared
pool (``components.ray_pool``), or in-process (tests, the benchmark's single-process baseline).

Per shard: tokenize -> append EOS -> pad/truncate to seq_len with a mask -> optional frozen-encoder
forward (no_grad, hidden state ``encoder.layer`` computed by only the layers it needs:
``models.frozen_encoder``, stored as ``encoder.dtype``; none under ``stage_a.online_encoder``, where
Stage A computes the same features itself) -> the shard and its sidecar through ``data.shard_job``
(atomic; the sidecar last).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

from ...components import faults
from ...data.dtypes import to_stored
from ...data.shard_job import ShardJob
from ...domains.text import TextCodec


class ShardWorker:

    def __init__(self, codec, seq_len: int, out_dir: str, encoder: Optional[dict] = None,
                 threads: int = 1, device: str = "cpu"):
        """``codec``: the domain's item codec (``domains.base.Domain.item_codec``), or a tokenizer
        reference for text."""
        import torch

        torch.set_num_threads(max(1, int(threads)))  # fixed per worker: same kernels on every run
        self.codec = codec if hasattr(codec, "encode_items") else TextCodec(codec, seq_len)
        self.tok = getattr(self.codec, "tok", None)  # the tokenizer (text)
        self.seq_len, self.job = int(seq_len), ShardJob(out_dir)
        self.enc = dict(encoder or {})
        self.model = None
        self.device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        if self.enc.get("model"):
            from ...models.frozen_encoder import load_encoder

            self.model = load_encoder(self.enc["model"], int(self.enc.get("layer", -1)), self.device)

    def tokenize(self, items: list) -> tuple[np.ndarray, np.ndarray, int]:
        """Items -> (tokens int32 [B, T], mask uint8 [B, T], #truncated) through the domain's codec
        (text: ids + EOS, then truncated/padded to seq_len)."""
        return self.codec.encode_items(items)[:3]

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        from ...models.frozen_encoder import stored_features

        dtype, bs = self.enc.get("dtype", "float16"), int(self.enc.get("batch_size", 64))
        outs = []
        for i in range(0, len(tokens), bs):
            ids = torch.from_numpy(tokens[i:i + bs]).to(self.device)
            # the same function computes them online (stage_a.online_encoder): one definition
            outs.append(to_stored(stored_features(self.model, ids, dtype), dtype))
        return np.concatenate(outs)

    def build(self, keys: list[str], texts: list) -> tuple[list[dict], int]:
        tokens, mask, truncated, fields = self.codec.encode_items(texts)
        feats = self.encode(tokens) if self.model is not None else None
        samples = []
        for j, key in enumerate(keys):
            s = {"__key__": key, "tokens": tokens[j], "mask": mask[j], **{f: v[j] for f, v in fields.items()}}
            if feats is not None:
                s["features"] = feats[j]
            samples.append(s)
        return samples, truncated

    def process(self, task: dict) -> dict:
        faults.point("preprocess.shard", shard=task["name"])
        t0 = time.perf_counter()
        samples, truncated = self.build(task["keys"], task["texts"])
        rec = self.job.write_shard(task["name"], samples)
        return self.job.mark_done(rec, task["fingerprint"], split=task["split"], first_key=task["keys"][0],
                                  last_key=task["keys"][-1], truncated=truncated,
                                  tokens=int(sum(int(s["mask"].sum()) for s in samples)),
                                  seconds=round(time.perf_counter() - t0, 3), pid=os.getpid())

    def ping(self) -> int:
        return os.getpid()

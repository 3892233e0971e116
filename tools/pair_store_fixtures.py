"""Inputs for the pair store without running preprocess or training Stage A: a small source shard
set in the real format (tokens, mask, float16 ``features``) written with the data layer, and a
freshly initialised (untrained) Stage A exported as a real artifact. The pair store only needs the
artifact to be a deterministic, loadable Stage A that fits the shards, so training adds nothing
to what its tests check. Shared by tests/test_pair_store.py and tools/bench_pair_store.py."""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np
import torch

from coupling_dist.config import DecoderConfig, FlowConfig, StageAConfig
from coupling_dist.data import shards as S


def synthetic_tokenizer(V: int, name: str = "synthetic") -> dict:
    """A tokenizer identity as preprocess records it; the hash depends on (name, V) only."""
    h = hashlib.sha256(f"{name}:{V}".encode()).hexdigest()[:16]
    return {"name": f"{name}-{V}", "vocab_size": V, "eos_id": V - 1, "pad_id": V - 1, "hash": h}


def make_source(data_dir: str, *, n_train: int = 48, n_heldout: int = 16, shard_size: int = 8, T: int = 16,
                H: int = 16, V: int = 64, seed: int = 0, tokenizer: Optional[dict] = None) -> S.Manifest:
    """Preprocess-like shards: features are a fixed embedding of the tokens plus noise (so a decoder
    could learn from them), zero at pads; EOS is the last real token, pads carry the pad id."""
    os.makedirs(data_dir, exist_ok=True)
    tok = tokenizer or synthetic_tokenizer(V)
    rng = np.random.default_rng(seed)
    # At most 4,096 rows: a [151k, 896] table (paper shapes in the benchmark) would take ~0.5 GB.
    table = rng.standard_normal((min(V, 4096), H)).astype(np.float32) * 2.0 + 0.5
    shards, index = [], 0
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        for j in range(0, n, shard_size):
            samples = []
            for _ in range(min(shard_size, n - j)):
                L = int(rng.integers(max(2, T // 4), T + 1))
                tokens = np.full(T, tok["pad_id"], np.int32)
                tokens[:L - 1] = rng.integers(0, V - 1, L - 1)
                tokens[L - 1] = tok["eos_id"]
                mask = (np.arange(T) < L).astype(np.uint8)
                feats = (table[tokens % len(table)] + 0.3 * rng.standard_normal((T, H))) * mask[:, None]
                samples.append({"__key__": f"{index:09d}", "tokens": tokens, "mask": mask,
                                "features": feats.astype(np.float16)})
                index += 1
            rec = S.write_shard(os.path.join(data_dir, S.shard_name(split, j // shard_size)), samples)
            rec.update(split=split, first_key=samples[0]["__key__"], last_key=samples[-1]["__key__"])
            shards.append(rec)
    man = S.Manifest(kind="preprocess", seq_len=T, shards=shards,
                     fields={"tokens": {"dtype": "int32", "shape": [T]}, "mask": {"dtype": "uint8", "shape": [T]},
                             "features": {"dtype": "float16", "shape": [T, H]}},
                     tokenizer=tok, encoder={"name": "synthetic-encoder", "hash": f"h{H}", "hidden_size": H})
    man.save(data_dir)
    return man


def tiny_stage_a_cfg(latent_dim: int = 8) -> StageAConfig:
    return StageAConfig(latent_dim=latent_dim, noise_scale=0.2,
                        flow=FlowConfig(kind="realnvp", layers=2, hidden=16, depth=1, heads=2),
                        decoder=DecoderConfig(width=16, depth=1, heads=2, ffn=32))


def export_random_stage_a(art_dir: str, data_dir: str, cfg: Optional[StageAConfig] = None, *, seed: int = 0,
                          seq_len: Optional[int] = None, feature_dim: Optional[int] = None,
                          tokenizer: Optional[dict] = None, encoder: Optional[dict] = None) -> str:
    """Export an untrained Stage A for the shard set ``data_dir`` (feature statistics estimated from
    its first shard, as training would). ``seq_len`` / ``feature_dim`` / ``tokenizer`` override
    what the artifact claims (``encoder``: keys that replace the shards' encoder record's), to build
    deliberately mismatched artifacts."""
    from coupling_dist.models.stage_a import StageAModel
    from coupling_dist.models.stage_a_export import export_stage_a

    man = S.Manifest.load(data_dir)
    T = man.seq_len
    H = feature_dim or int(man.fields["features"]["shape"][-1])
    tok = tokenizer or man.tokenizer
    torch.manual_seed(seed)
    model = StageAModel(H, int(tok["vocab_size"]), cfg or tiny_stage_a_cfg())
    with torch.no_grad():  # move off the (near-identity) initialisation so the flow does something
        for p in model.flow.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if H == int(man.fields["features"]["shape"][-1]):
        first = S.read_shard(os.path.join(data_dir, man.shards[0]["name"]))
        feats = torch.from_numpy(np.stack([s["features"] for s in first]))
        mask = torch.from_numpy(np.stack([s["mask"] for s in first]))
        model.set_feature_stats(*StageAModel.estimate_feature_stats([(feats, mask)]))
    meta = {"seq_len": seq_len or T, "tokenizer": tok, "encoder": dict(man.encoder, **(encoder or {})),
            "train_step": 0}
    return export_stage_a(model, art_dir, meta)

"""A small real pair store for Stage B tests, written directly with the data layer (seconds, instead
of running preprocess -> stage_a -> pair_store): real Lee-corpus sentences tokenized with the real
Qwen2.5 tokenizer (EOS appended, then padded), and latents z that depend on the tokens (a fixed
random projection of token embeddings plus noise), so a generator can learn from them."""
from __future__ import annotations

import os

import numpy as np


def make_pair_store(run_dir: str, *, n_train: int = 96, n_heldout: int = 16, seq_len: int = 32, latent_dim: int = 16,
                    K: int = 1, tokenizer: str = "asset:qwen2.5-tokenizer", shard_size: int = 48,
                    teacher_topk: int = 0, teacher: str = "tiny:qwen2", temperature: float = 2.0) -> str:
    """``teacher_topk`` > 0: also the KD cache of ``teacher`` at ``temperature``, written with the
    pair-store writer's own functions (models.teacher), as ``pair_store.teacher_topk`` would."""
    from coupling_dist.components import assets
    from coupling_dist.data.shards import Manifest, write_shard

    out = os.path.join(run_dir, "pair_store")
    os.makedirs(out, exist_ok=True)
    tok = assets.load_tokenizer(tokenizer)
    ident = assets.tokenizer_identity(tokenizer)
    with open(assets.resolve("asset:lee-corpus"), encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()][: n_train + n_heldout]
    rng = np.random.default_rng(0)
    table = rng.standard_normal((len(tok), latent_dim)).astype(np.float32) if latent_dim else None
    samples = []
    for i, text in enumerate(lines):
        ids = tok(text, add_special_tokens=False)["input_ids"][: seq_len - 1] + [tok.eos_token_id]
        n = len(ids)
        ids = ids + [tok.pad_token_id] * (seq_len - n)
        mask = np.zeros(seq_len, np.uint8)
        mask[:n] = 1
        arr = np.asarray(ids, np.int32)
        z = np.stack([table[arr] * 0.7 + 0.5 * rng.standard_normal((seq_len, latent_dim)) for _ in range(K)])
        samples.append({"__key__": f"{i:09d}", "z": z.astype(np.float16), "tokens": arr, "mask": mask})
    extra = {"kind": "pair_store", "latent_dim": latent_dim, "multiplicity": K}
    fields = {"z": {"dtype": "float16", "shape": [K, seq_len, latent_dim]}, "tokens": {"dtype": "int32", "shape": [seq_len]},
              "mask": {"dtype": "uint8", "shape": [seq_len]}}
    if teacher_topk:
        import torch

        from coupling_dist.models import teacher as tm

        path = assets.resolve(teacher)
        model = assets.load_causal_lm(path, torch.device("cpu"))
        for j in range(0, len(samples), 32):
            chunk = samples[j:j + 32]
            tokens = torch.from_numpy(np.stack([x["tokens"] for x in chunk]).astype(np.int64))
            mask = torch.from_numpy(np.stack([x["mask"] for x in chunk]))
            for x, c in zip(chunk, tm.cache_arrays(model, tokens, mask, teacher_topk, temperature)):
                x.update(c)
        fields.update(tm.cache_fields(seq_len, teacher_topk))
        extra["teacher_cache"] = tm.cache_record(teacher, path, temperature, teacher_topk)
    records = []
    for split, chunk in (("train", samples[:n_train]), ("heldout", samples[n_train:])):
        for j in range(0, len(chunk), shard_size):
            path = os.path.join(out, f"shard-{split}-{j // shard_size:05d}.tar")
            rec = write_shard(path, chunk[j:j + shard_size])
            rec["split"] = split
            records.append(rec)
    man = Manifest.for_pairs(out, records, fields=fields, seq_len=seq_len, tokenizer=ident, encoder={}, extra=extra)
    man.save(out)
    return out

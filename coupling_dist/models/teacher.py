"""The frozen KD teacher of Stage B: a Hugging Face causal LM (or GGUF), loaded without gradients
by ``components.assets.load_causal_lm``.

It is not part of the trained module (neither DeepSpeed nor the EMA sees it); the Stage B task runs
its trunk on the ground-truth tokens and feeds only its head shard to the chunked loss, or reads
the top-k cache (``pair_store.teacher_topk``) that the pair store wrote with the functions here.
"""
from __future__ import annotations

import torch
from torch import nn


def teacher_flops_per_token(model: nn.Module, seq_len: int, vocab: int) -> float:
    """Forward-only FLOPs per token of the teacher: 2 x (non-embedding params + head) + attention."""
    conf = model.config
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb - (0 if head is model.get_input_embeddings().weight else head.numel())
    return 2.0 * (body + conf.hidden_size * vocab) + 4.0 * seq_len * conf.hidden_size * conf.num_hidden_layers


def teacher_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the teacher is frozen, inference only), fp32 on CPUs (no fast bf16 GEMMs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def trunk_hidden(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The teacher's last hidden states [B, T, Ht] on ``tokens`` (no head: callers apply the head
    chunked, or only a vocabulary shard of it)."""
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=tokens, attention_mask=mask.long()).last_hidden_state


def topk_from_logits(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of teacher logits [N, V] -> (top-k ids [N, k] int32, their log-probabilities at
    ``temperature`` [N, k] fp32, log of the remaining mass [N] fp32). The tail is the log-sum-exp
    of the other ids' log-probabilities (-inf when k = V), not log(1 - sum): exact when the top-k
    hold nearly all the mass."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    vals, ids = torch.topk(logp, k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, ids, -float("inf")), -1)
    return ids.to(torch.int32), vals, tail


@torch.no_grad()
def topk_logprobs(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, k: int, temperature: float,
                  chunk_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KD cache of one batch: ``topk_from_logits`` at every teacher position, unshifted
    (position t holds the prediction of token t + 1) -> [B, T, k], [B, T, k], [B, T]. Logits are
    formed ``chunk_rows`` positions at a time: [B*T, V] at once would be gigabytes at V = 152k."""
    h = trunk_hidden(model, tokens, mask)
    B, T = tokens.shape
    rows = h.reshape(B * T, -1)
    head = model.get_output_embeddings().weight
    parts = [topk_from_logits(rows[i:i + chunk_rows] @ head.t(), k, temperature) for i in range(0, B * T, chunk_rows)]
    ids, logp, tail = (torch.cat(x) for x in zip(*parts))
    return ids.reshape(B, T, k), logp.reshape(B, T, k), tail.reshape(B, T)


# --------------------------------------------------------------------------- the pair store's KD cache
# Fields per sample (k = pair_store.teacher_topk): ids int32 [T, k]; log-probabilities at the KD
# temperature float32 [T, k] -- not float16: fp16 keeps ~3 significant digits, so a log-prob of -9
# would be off by up to 0.004 nats (0.4 % of its probability) and the tail log-mass of a peaked row
# far more, while the ids (int32) already cost as much as fp32 values, so fp16 would save at most
# a quarter of the cache; tail log-mass float32 [T] (-inf when the top-k hold all the mass).
CACHE_FIELDS = ("teacher_ids", "teacher_logp", "teacher_tail")


def cache_fields(seq_len: int, k: int) -> dict:
    """Manifest field specs of the KD cache."""
    return {"teacher_ids": {"dtype": "int32", "shape": [seq_len, k]},
            "teacher_logp": {"dtype": "float32", "shape": [seq_len, k]},
            "teacher_tail": {"dtype": "float32", "shape": [seq_len]}}


def cache_record(ref: str, path: str, temperature: float, k: int) -> dict:
    """What made a KD cache (the pair-store manifest's ``teacher_cache``): Stage B refuses a cache
    whose teacher identity hash or temperature differ from ``stage_b.kd``."""
    from ..components import assets

    return {"teacher": {"name": ref, "hash": assets.identity(path)["hash"]}, "temperature": float(temperature),
            "topk": int(k)}


def cache_arrays(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, k: int, temperature: float) -> list[dict]:
    """The KD cache of a batch as one dict of numpy arrays per sample (the shard format)."""
    ids, logp, tail = topk_logprobs(model, tokens, mask, k, temperature)
    ids, logp, tail = ids.cpu().numpy(), logp.float().cpu().numpy(), tail.float().cpu().numpy()
    return [dict(zip(CACHE_FIELDS, (ids[j], logp[j], tail[j]))) for j in range(tokens.shape[0])]

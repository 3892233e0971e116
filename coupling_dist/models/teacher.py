"""The frozen KD teacher of Stage B: a Hugging Face causal LM (or GGUF), loaded without gradients
by ``components.assets.load_causal_lm``.

It is not part of the trained module (neither DeepSpeed nor the EMA sees it); the Stage B task runs
its trunk on the ground-truth tokens and feeds only its head shard to the chunked loss.
"""
from __future__ import annotations

from torch import nn


def teacher_flops_per_token(model: nn.Module, seq_len: int, vocab: int) -> float:
    """Forward-only FLOPs per token of the teacher: 2 x (non-embedding params + head) + attention."""
    conf = model.config
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb - (0 if head is model.get_input_embeddings().weight else head.numel())
    return 2.0 * (body + conf.hidden_size * vocab) + 4.0 * seq_len * conf.hidden_size * conf.num_hidden_layers

"""The frozen KD teacher of Stage B: a Hugging Face causal LM, loaded without gradients.

It is not part of the trained module (neither DeepSpeed nor the EMA sees it); the Stage B task runs
its trunk on the ground-truth tokens and feeds only its head shard to the chunked loss.
"""
from __future__ import annotations

import os

import torch
from torch import nn


def load_teacher(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=os.path.isdir(path), dtype=dtype)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_flops_per_token(model: nn.Module, seq_len: int, vocab: int) -> float:
    """Forward-only FLOPs per token of the teacher: 2 x (non-embedding params + head) + attention."""
    conf = model.config
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb - (0 if head is model.get_input_embeddings().weight else head.numel())
    return 2.0 * (body + conf.hidden_size * vocab) + 4.0 * seq_len * conf.hidden_size * conf.num_hidden_layers

"""Shapes and FLOPs of the frozen LMs (encoder, KD teacher, scorer) without loading their weights.

A model's config comes from ``components.assets.load_config`` (a local directory, ``asset:``,
``tiny:``, a GGUF file, or a hub id when the hub is reachable). When that fails -- the paper's
Qwen2.5-0.5B and GPT-2 Large are hub ids, and this machine has no hub -- ``KNOWN`` holds their
published configs (and a local tokenizer with the same files), and the plan says it used them.
Models are instantiated on the meta device: exact parameter counts, no memory, no weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from ..components import assets

# The published configs of the paper's frozen LMs (huggingface.co/<id>/blob/main/config.json).
_QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
               "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
               "tie_word_embeddings": True, "max_position_embeddings": 32768}
_GPT2_LARGE = {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20, "n_positions": 1024,
               "vocab_size": 50257}
KNOWN = {
    "Qwen/Qwen2.5-0.5B": {"config": _QWEN25_05B, "tokenizer": "asset:qwen2.5-tokenizer"},
    "gpt2-large": {"config": _GPT2_LARGE, "tokenizer": "asset:gpt2-tokenizer"},
    "openai-community/gpt2-large": {"config": _GPT2_LARGE, "tokenizer": "asset:gpt2-tokenizer"},
}
_LAYER_PARAM = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")  # decoder layer i's parameters (Qwen2/Llama, GPT-2)


@dataclass
class LMShape:
    ref: str
    config: Any  # a transformers PretrainedConfig
    source: str  # "config" or a sentence saying the built-in table was used

    @property
    def hidden(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.config.n_embd)

    @property
    def layers(self) -> int:
        return int(getattr(self.config, "num_hidden_layers", None) or self.config.n_layer)

    @property
    def vocab(self) -> int:
        return int(self.config.vocab_size)


_SHAPES: dict = {}
_MODELS: dict = {}


def lm_shape(ref: Optional[str]) -> Optional[LMShape]:
    """The config of ``ref`` (see module doc); None when it is neither loadable nor in ``KNOWN``."""
    if ref is None:
        return None
    if ref not in _SHAPES:
        try:
            _SHAPES[ref] = LMShape(ref, assets.load_config(ref), "config")
        except Exception as e:  # offline hub id, missing directory: the table, or nothing
            known = KNOWN.get(ref)
            if known is None:
                _SHAPES[ref] = None
            else:
                from transformers import AutoConfig

                c = dict(known["config"])
                conf = AutoConfig.for_model(c.pop("model_type"), **c)
                _SHAPES[ref] = LMShape(ref, conf, f"{ref}: config not loadable here ({type(e).__name__}); "
                                                  f"using its published config (built-in table)")
    return _SHAPES[ref]


def meta_model(shape: LMShape):
    """The causal LM of ``shape`` on the meta device (parameters without storage)."""
    if shape.ref not in _MODELS:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            _MODELS[shape.ref] = AutoModelForCausalLM.from_config(shape.config)
    return _MODELS[shape.ref]


def layer_params(shape: LMShape) -> list[int]:
    """Parameters of each decoder layer, in order."""
    counts = [0] * shape.layers
    for name, p in meta_model(shape).named_parameters():
        m = _LAYER_PARAM.search(name)
        if m:
            counts[int(m.group(1))] += p.numel()
    return counts


def encoder_flops_per_token(shape: LMShape, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of the frozen encoder run up to ``encoder.layer`` (only those layers
    run: ``models.frozen_encoder``): 2 x their parameters + attention scores (QK^T and AV)."""
    k = layer % (shape.layers + 1)
    return 2.0 * sum(layer_params(shape)[:k]) + 4.0 * seq_len * shape.hidden * k


def lm_flops_per_token(shape: LMShape, seq_len: int, head_vocab: Optional[int] = None) -> float:
    """Forward FLOPs per token of the whole LM with its head (the KD teacher, the scorer): the
    teacher's own accounting (``models.teacher.teacher_flops_per_token``) on the meta model."""
    from ..models.teacher import teacher_flops_per_token

    return teacher_flops_per_token(meta_model(shape), seq_len, head_vocab or shape.vocab)


def lm_params(shape: LMShape) -> int:
    return sum(p.numel() for p in meta_model(shape).parameters())


_TOKENIZERS: dict = {}


def load_tokenizer(ref: str):
    """(the tokenizer, a note); for a known hub id not loadable here, its local twin; (None, why)."""
    if ref not in _TOKENIZERS:
        try:
            _TOKENIZERS[ref] = (assets.load_tokenizer(ref), "")
        except Exception as e:
            known = KNOWN.get(ref)
            if known is None:
                _TOKENIZERS[ref] = (None, f"tokenizer {ref!r} not loadable here ({type(e).__name__})")
            else:
                _TOKENIZERS[ref] = (assets.load_tokenizer(known["tokenizer"]),
                                    f"tokenizer {ref!r} not loadable here: using {known['tokenizer']} (the same files)")
    return _TOKENIZERS[ref]


def tokenizer_vocab(ref: str) -> tuple[Optional[int], str]:
    """(the tokenizer's vocabulary size as preprocess records it, a note); (None, why) if unknown."""
    tok, note = load_tokenizer(ref)
    return (None if tok is None else len(tok.get_vocab())), note

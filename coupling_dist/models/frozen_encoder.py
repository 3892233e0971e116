"""The frozen encoder: a causal LM's backbone that returns one hidden state -- run by preprocess
(features stored in the shards) or per batch inside Stage A and the pair store
(``stage_a.online_encoder``: ``OnlineFeatures``); ``stored_features`` is the one definition of the
features both paths produce.

``encoder.layer`` = k selects ``hidden_states[k]`` of the full model (0 = embeddings, L = the
final, normed output; negative counts from the end). For k < L only the first k decoder layers are
kept (and the final norm, which ``hidden_states[k]`` never saw, is dropped): the rest of the model
would be computed and thrown away, and on a 30-layer LM read at layer 12 that is most of the work.
"""
from __future__ import annotations

import torch
from torch import nn

from ..components.assets import load_causal_lm

STORED_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Where HF backbones keep their decoder layers and final norm (Llama/Qwen2/Mistral..., GPT-2).
_LAYER_ATTRS = ("layers", "h")
_NORM_ATTRS = ("norm", "ln_f")


def _attr(module: nn.Module, names, kind: type) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), kind)), None)


class FrozenEncoder(nn.Module):

    def __init__(self, backbone: nn.Module, layer: int):
        super().__init__()
        n = int(backbone.config.num_hidden_layers)
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"encoder layer {layer} is out of range ({n} layers: {n + 1} hidden states)")
        self.layer = layer % (n + 1)
        layers, norm = _attr(backbone, _LAYER_ATTRS, nn.ModuleList), _attr(backbone, _NORM_ATTRS, nn.Module)
        # An architecture whose layer list we cannot find runs whole (correct, only slower).
        self.truncated = self.layer < n and layers is not None and norm is not None
        if self.truncated:
            setattr(backbone, layers, nn.ModuleList(list(getattr(backbone, layers))[:self.layer]))
            setattr(backbone, norm, nn.Identity())
            backbone.config.num_hidden_layers = self.layer  # some backbones loop over config's count
        self.backbone = backbone

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.truncated:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.layer]


def load_encoder(ref: str, layer: int, device="cpu", dtype=torch.float32) -> FrozenEncoder:
    """The backbone only (no LM head: no [T, V] logits for features we do not need)."""
    return FrozenEncoder(load_causal_lm(ref, device, dtype).base_model, layer)


@torch.no_grad()
def stored_features(encoder: FrozenEncoder, ids: torch.Tensor, dtype: str) -> torch.Tensor:
    """The features of token ids [B, T] as the shards hold them: [B, T, H] rounded to ``dtype``
    (``encoder.dtype``). Full attention over the padded sequence (``data.source.PAD_FEATURES``):
    pad positions get the LM's own features for the pad/EOS ids that follow the text."""
    ids = ids.long()
    return encoder(ids, torch.ones_like(ids)).float().to(STORED_TORCH_DTYPES[dtype])


class OnlineFeatures:
    """``stage_a.online_encoder``: the frozen encoder on one rank, computing a batch's features
    from its tokens -- the values preprocess would have stored (``stored_features``), in place of
    reading them. Not an ``nn.Module`` of the trained model: no gradients, never checkpointed or
    partitioned by ZeRO. ``compute_dtype``: the training precision (fp32 on CPU, bf16 on CUDA)."""

    def __init__(self, ref: str, layer: int, dtype: str, device, compute_dtype=torch.float32):
        self.dtype, self.device = dtype, torch.device(device)
        self.encoder = load_encoder(ref, layer, self.device, compute_dtype).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return stored_features(self.encoder, tokens.to(self.device), self.dtype)

    def flops_per_sample(self, seq_len: int) -> float:
        """Forward FLOPs per sequence: 2 per weight of the layers run (embedding lookups excluded)
        per token, plus attention's QK^T and AV at full attention."""
        bb = self.encoder.backbone
        emb = sum(p.numel() for p in bb.get_input_embeddings().parameters())
        weights = sum(p.numel() for p in bb.parameters()) - emb
        layers = int(bb.config.num_hidden_layers)
        hidden = int(getattr(bb.config, "hidden_size", 0) or getattr(bb.config, "n_embd", 0))
        return float(seq_len * 2 * weights + layers * 4 * seq_len * seq_len * hidden)

"""The frozen encoder of preprocessing: a causal LM's backbone that returns one hidden state.

``encoder.layer`` = k selects ``hidden_states[k]`` of the full model (0 = embeddings, L = the
final, normed output; negative counts from the end). For k < L only the first k decoder layers are
kept (and the final norm, which ``hidden_states[k]`` never saw, is dropped): the rest of the model
would be computed and thrown away, and on a 30-layer LM read at layer 12 that is most of the work.
"""
from __future__ import annotations

import torch
from torch import nn

from ..components.assets import load_causal_lm

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

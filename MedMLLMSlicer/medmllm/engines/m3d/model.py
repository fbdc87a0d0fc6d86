"""The whole M3D-LaMed network: transformers' own causal LM plus our vision / projector / seg modules.

The extra modules are attached under the language model's `model` (`model.vision_tower`,
`model.mm_projector`, `model.seg_projector`, `model.seg_module`) so `lm.state_dict()` has exactly
the official tensor names, and the checkpoint loads with a plain strict name/shape comparison.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from medmllm.engines.m3d.config import LamedConfig
from medmllm.engines.m3d.projector import SpatialPoolingProjector
from medmllm.engines.m3d.segvol import SegVol
from medmllm.engines.m3d.vit3d import VisionTower, ViT3D


def _cache_argument(module: nn.Module) -> str:
    """transformers 5 names the KV cache `cache` (`past_key_values` is deprecated there), 4.x only
    knows `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class LamedModel(nn.Module):
    """Holds `lm` (Phi3ForCausalLM / LlamaForCausalLM) and exposes the pieces the decoder needs."""

    def __init__(self, config: LamedConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM, Phi3ForCausalLM

        self.config = config
        cls = Phi3ForCausalLM if config.family == "phi3" else LlamaForCausalLM
        self.lm = cls(config.text_config())
        inner = self.lm.model
        vit = ViT3D(
            config.image_channel,
            config.image_size,
            config.patch_size,
            config.vision_hidden_size,
            config.vision_mlp_dim,
            config.vision_num_layers,
            config.vision_num_heads,
            cls_token=True,
        )
        inner.vision_tower = VisionTower(vit)
        inner.mm_projector = SpatialPoolingProjector(
            config.patch_grid,
            config.mm_hidden_size,
            config.hidden_size,
            config.proj_layer_num,
            config.proj_pooling_size,
        )
        if config.seg_enabled:
            inner.seg_projector = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.ReLU(),
                nn.Linear(config.hidden_size, config.mm_hidden_size),
                nn.Dropout(0.1),
            )
            inner.seg_module = SegVol(
                config.image_size,
                config.patch_size,
                config.seg_embed_dim,
                config.seg_vit_mlp_dim,
                config.seg_vit_num_layers,
                config.seg_vit_num_heads,
                config.seg_decoder_mlp_dim,
            )

    @property
    def inner(self) -> Any:
        return self.lm.model

    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype

    def image_tensor(self, image: Any) -> torch.Tensor:
        """(D, H, W) array in [0, 1] -> (1, C, D, H, W) on the model's device and dtype."""
        t = torch.as_tensor(image).to(device=self.device, dtype=self.dtype)
        return t.reshape(1, self.config.image_channel, *self.config.image_size)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 256, hidden): what replaces prompt positions 1..256."""
        return self.inner.mm_projector(self.inner.vision_tower(image))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(ids)

    def prefix_embeds(self, first_id: int, features: torch.Tensor) -> torch.Tensor:
        """The prompt's first token (see `Loaded.prefix_id`) followed by the image features: the
        per-volume prompt prefix."""
        first = self.embed(torch.tensor([[first_id]], device=self.device))
        return torch.cat([first, features.to(first.dtype)], dim=1)

    def run(
        self,
        embeds: torch.Tensor,
        cache: Optional[Any],
        positions: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Last-layer (final-norm) hidden states for `embeds`, extending `cache` in place.

        `mask`: a ready 4D additive mask (rows, 1, queries, keys), passed through as is; the
        batched decode uses it to hide each row's padding.
        """
        out = self.inner(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            **{_cache_argument(self.inner): cache},
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden).float()

    def seg_embedding(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner.seg_module.encode(image)

    def seg_logits(self, embedding: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Mask logits (D, H, W) at the model grid for the hidden state that predicted [SEG]."""
        prompt = self.inner.seg_projector(hidden.reshape(1, -1).to(self.dtype))
        return self.inner.seg_module.decode(embedding, prompt)[0, 0].float()

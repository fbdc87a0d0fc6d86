"""The MiniGPT-Med (MiniGPT-v2) network: EVA-ViT-g, ln_vision, the 4-patch projection, LLaMA-2.

Attribute names follow `minigpt4/models/minigpt_v2.py` (`visual_encoder`, `ln_vision`,
`llama_proj`, `llama_model`) so checkpoint names map one to one; the LoRA update is merged into
`llama_model`'s q_proj / v_proj weights at load, so the language model is transformers' own
LlamaForCausalLM and decoding needs no adapter code.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from medmllm.engines.minigptmed.config import MiniGPTMedConfig
from medmllm.engines.minigptmed.eva_vit import VisionTransformer

# blip_processors.py: BlipImageBaseProcessor's defaults (the CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FP32LayerNorm(nn.LayerNorm):
    """`base_model.py:LayerNorm`: computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def image_tensor(pixels: np.ndarray, size: int) -> torch.Tensor:
    """8-bit grayscale slice -> (1, 3, size, size) float32, as the official eval transform:
    grayscale pasted into RGB, `Resize((size, size), BICUBIC)` on the PIL image (no padding, aspect
    not kept), `ToTensor`, CLIP mean/std `Normalize`."""
    from PIL import Image

    array = np.ascontiguousarray(pixels, dtype=np.uint8)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale slice, got shape {array.shape}")
    rgb = Image.fromarray(array).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


class MiniGPTMed(nn.Module):
    def __init__(self, config: MiniGPTMedConfig, llama: Any) -> None:
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config)
        self.ln_vision = FP32LayerNorm(config.vision_width)
        self.llama_proj = nn.Linear(config.vision_width * 4, llama.config.hidden_size)
        self.llama_model = llama

    @property
    def lm(self) -> Any:
        """The causal LM (what the shared decode loop calls `lm`)."""
        return self.llama_model

    @property
    def device(self) -> torch.device:
        return self.llama_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llama_model.lm_head.weight.dtype

    def encode_img(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) -> (1, S*S/(14*14*4), hidden): cls dropped, 4 consecutive patch tokens
        concatenated into one (width * 4) vector, then `llama_proj` (`minigpt_v2.py:encode_img`)."""
        vision_dtype = self.llama_proj.weight.dtype
        feats = self.ln_vision(self.visual_encoder(image.to(self.device, vision_dtype)))[:, 1:, :]
        b, n, c = feats.shape
        return self.llama_proj(feats.reshape(b, n // 4, c * 4)).to(self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llama_model.model.embed_tokens(ids)

    def run(
        self, embeds: torch.Tensor, cache: Optional[Any], positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Final-norm hidden states for `embeds`, extending `cache` in place."""
        out = self.llama_model.model(
            inputs_embeds=embeds, past_key_values=cache, position_ids=positions, use_cache=cache is not None
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llama_model.lm_head(hidden).float()

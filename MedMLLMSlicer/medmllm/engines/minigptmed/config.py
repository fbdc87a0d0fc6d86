"""Sizes of the MiniGPT-Med network that are not in any checkpoint file.

The official code hard-codes them (Vision-CAIR/MiniGPT-Med@adb55c3 `minigpt4/models/eva_vit.py:
create_eva_vit_g`, `minigpt_v2.py` defaults, `minigpt4/configs/models/minigpt_v2.yaml`); the
LLaMA sizes come from the LLaMA folder's own config.json. An optional JSON/dict overrides them so
tiny test checkpoints load through exactly the same code as the real ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Union

from medmllm.engines._checkpoint import read_json_object
from medmllm.engines.base import EngineError


@dataclass(frozen=True)
class MiniGPTMedConfig:
    image_size: int = 448  # eval_configs/minigptv2_eval.yaml: image_size 448
    patch_size: int = 14
    vision_width: int = 1408  # EVA-ViT-g/14
    vision_depth: int = 39  # BLIP-2 drops the 40th block of EVA-CLIP-g
    vision_heads: int = 16  # 1408 // 88
    vision_mlp_ratio: float = 4.3637  # int(1408 * 4.3637) = 6144
    eva_image_size: int = 224  # eva_vit_g.pth position grid: 16 x 16 + cls
    lora_r: int = 64
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        positive = ("image_size", "patch_size", "vision_width", "vision_depth", "vision_heads", "lora_r")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EngineError(f"MiniGPT-Med config: {name} must be a positive integer, got {value!r}")
        if self.vision_width % self.vision_heads:
            raise EngineError("MiniGPT-Med config: vision_width must be divisible by vision_heads")
        if self.image_size % self.patch_size or self.eva_image_size % self.patch_size:
            raise EngineError("MiniGPT-Med config: image sizes must be multiples of patch_size")
        if self.num_patches % 4:
            raise EngineError(
                "MiniGPT-Med config: the patch count must be divisible by 4 (4 patches per token)"
            )
        if not self.vision_mlp_ratio > 0 or not self.lora_alpha > 0:
            raise EngineError("MiniGPT-Med config: vision_mlp_ratio and lora_alpha must be positive")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def image_tokens(self) -> int:
        """Language-model positions one image takes: 4 neighbouring patches become one token."""
        return self.num_patches // 4

    @property
    def mlp_hidden(self) -> int:
        return int(self.vision_width * self.vision_mlp_ratio)

    @property
    def lora_scaling(self) -> float:
        """peft's `lora_alpha / r` (16 / 64 = 0.25 for the released checkpoint)."""
        return self.lora_alpha / self.lora_r

    @classmethod
    def from_value(cls, value: Union[str, Mapping[str, Any], None]) -> MiniGPTMedConfig:
        """None -> the official sizes; a dict or the path of a JSON file -> those overrides."""
        if value is None:
            return cls()
        data: Any = value
        if isinstance(value, str):
            if not os.path.isfile(value):
                raise EngineError(f"MiniGPT-Med config file {value!r} does not exist")
            data = read_json_object(value, "the MiniGPT-Med config")
        if not isinstance(data, Mapping):
            raise EngineError("the MiniGPT-Med config must be a JSON object of sizes")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EngineError(
                f"unknown MiniGPT-Med config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

"""M3D-LaMed `config.json` -> one validated, typed object.

The official checkpoints keep the language-model keys (Phi-3 / Llama-2) and the LaMed keys in one
flat file with `model_type` `lamed_phi3` / `lamed_llama`; we split them so the language model is
built by transformers' own class and the rest by ours, without `trust_remote_code`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from medmllm.engines._checkpoint import read_json_object
from medmllm.engines.base import EngineError

FAMILIES = {"lamed_phi3": "phi3", "lamed_llama": "llama"}

# Keys that belong to LaMed (or to the file itself), not to the transformers language-model config.
_LAMED_KEYS = {
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "image_channel",
    "image_size",
    "patch_size",
    "vision_tower",
    "vision_select_layer",
    "vision_select_feature",
    "mm_projector_type",
    "proj_layer_type",
    "proj_layer_num",
    "proj_pooling_type",
    "proj_pooling_size",
    "mm_hidden_size",
    "segmentation_module",
    "seg_token_id",
    "vision_hidden_size",
    "vision_mlp_dim",
    "vision_num_layers",
    "vision_num_heads",
    "seg_embed_dim",
    "seg_vit_mlp_dim",
    "seg_vit_num_layers",
    "seg_vit_num_heads",
    "seg_decoder_mlp_dim",
}

# Values the official code hard-codes or the released configs fix; anything else is another model.
_REQUIRED_VALUES = {
    "vision_tower": ("vit3d",),
    "vision_select_layer": (-1,),
    "vision_select_feature": ("patch",),
    "mm_projector_type": ("spp",),
    "proj_layer_type": ("mlp",),
    "proj_pooling_type": ("spatial",),
}


@dataclass(frozen=True)
class LamedConfig:
    """Everything our modules need; defaults are the official values the configs leave out."""

    family: str
    text: Dict[str, Any]
    image_channel: int = 1
    image_size: Tuple[int, int, int] = (32, 256, 256)
    patch_size: Tuple[int, int, int] = (4, 16, 16)
    vision_hidden_size: int = 768
    vision_mlp_dim: int = 3072
    vision_num_layers: int = 12
    vision_num_heads: int = 12
    mm_hidden_size: int = 768
    proj_layer_num: int = 2
    proj_pooling_size: int = 2
    segmentation_module: Optional[str] = "segvol"
    seg_token_id: Optional[int] = None
    seg_embed_dim: int = 768
    seg_vit_mlp_dim: int = 3072
    seg_vit_num_layers: int = 12
    seg_vit_num_heads: int = 12
    seg_decoder_mlp_dim: int = 2048
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def seg_enabled(self) -> bool:
        return self.segmentation_module is not None

    @property
    def patch_grid(self) -> Tuple[int, int, int]:
        """Patches per axis before pooling: (8, 16, 16) for the official geometry."""
        return tuple(i // p for i, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_image_tokens(self) -> int:
        """Tokens after spatial pooling (the official 256): positions 1..N of every prompt."""
        n = 1
        for g in self.patch_grid:
            n *= g // self.proj_pooling_size
        return n

    @property
    def context_length(self) -> int:
        """Longest sequence we run: the position limit, capped at Phi-3's sliding window (2047 for
        the 4k model) so that sliding-window attention never differs from full causal attention."""
        limit = int(self.text.get("max_position_embeddings", 4096))
        window = self.text.get("sliding_window")
        return min(limit, int(window)) if window else limit

    def text_config(self) -> Any:
        """The transformers config of the language model (Phi3Config / LlamaConfig).

        `sliding_window` is dropped: no sequence reaches it (`context_length`), and without it the
        static KV cache keeps its length in a tensor, so a compiled decode step is not recompiled
        at every token.
        """
        from transformers import LlamaConfig, Phi3Config

        cls = Phi3Config if self.family == "phi3" else LlamaConfig
        return cls(**{**self.text, "sliding_window": None} if self.family == "phi3" else self.text)

    @classmethod
    def from_folder(cls, folder: str) -> LamedConfig:
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise EngineError(f"{folder} has no config.json; point --model at an M3D-LaMed checkpoint folder")
        return cls.from_dict(read_json_object(path, "the checkpoint config"))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> LamedConfig:
        model_type = data.get("model_type")
        if model_type not in FAMILIES:
            raise EngineError(
                f"config.json has model_type {model_type!r}; the m3d engine loads M3D-LaMed checkpoints "
                f"(model_type {' or '.join(sorted(FAMILIES))})"
            )
        for key, allowed in _REQUIRED_VALUES.items():
            if key in data and data[key] not in allowed:
                raise EngineError(
                    f"config.json: {key}={data[key]!r} is not supported (expected {allowed[0]!r})"
                )
        for key in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(data.get(key), int):
                raise EngineError(f"config.json: {key} is missing or not an integer")
        text = {k: v for k, v in data.items() if k not in _LAMED_KEYS}
        ints = {
            k: int(data[k])
            for k in (
                "image_channel",
                "vision_hidden_size",
                "vision_mlp_dim",
                "vision_num_layers",
                "vision_num_heads",
                "proj_layer_num",
                "proj_pooling_size",
                "seg_vit_mlp_dim",
                "seg_vit_num_layers",
                "seg_vit_num_heads",
                "seg_decoder_mlp_dim",
            )
            if data.get(k) is not None
        }
        vision_hidden = int(data.get("vision_hidden_size", data.get("mm_hidden_size", 768)))
        config = cls(
            family=FAMILIES[model_type],
            text=text,
            image_size=_triple(data, "image_size", (32, 256, 256)),
            patch_size=_triple(data, "patch_size", (4, 16, 16)),
            mm_hidden_size=int(data.get("mm_hidden_size", vision_hidden)),
            segmentation_module=data.get("segmentation_module"),
            seg_token_id=data.get("seg_token_id"),
            seg_embed_dim=int(data.get("seg_embed_dim", data.get("mm_hidden_size", 768))),
            raw=dict(data),
            **ints,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Shape rules the modules rely on, checked up front so a bad config fails with a sentence."""
        if self.mm_hidden_size != self.vision_hidden_size:
            raise EngineError(
                "config.json: mm_hidden_size must equal the vision tower width (vision_hidden_size)"
            )
        for axis, (i, p) in enumerate(zip(self.image_size, self.patch_size)):
            if p <= 0 or i % p or (i // p) % self.proj_pooling_size:
                raise EngineError(
                    f"config.json: image_size {list(self.image_size)} is not divisible by patch_size "
                    f"{list(self.patch_size)} x pooling {self.proj_pooling_size} on axis {axis}"
                )
        if self.vision_hidden_size % self.vision_num_heads:
            raise EngineError("config.json: vision_hidden_size must be a multiple of vision_num_heads")
        if self.seg_enabled:
            if self.segmentation_module.lower() != "segvol":
                raise EngineError(
                    f"config.json: segmentation_module {self.segmentation_module!r} is not supported"
                )
            if not isinstance(self.seg_token_id, int) or not 0 <= self.seg_token_id < self.vocab_size:
                raise EngineError("config.json: seg_token_id is missing or outside the vocabulary")
            if self.seg_embed_dim != self.mm_hidden_size:
                raise EngineError(
                    "config.json: seg_embed_dim must equal mm_hidden_size (the [SEG] projector output)"
                )
            if self.seg_embed_dim % 16:
                raise EngineError("config.json: seg_embed_dim must be a multiple of 16")


def _triple(data: Dict[str, Any], key: str, default: Tuple[int, int, int]) -> Tuple[int, int, int]:
    value = data.get(key, default)
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, int) for v in value):
        raise EngineError(f"config.json: {key} must be three integers (D, H, W), got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))

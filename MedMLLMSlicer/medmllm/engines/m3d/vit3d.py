"""The 3D ViT both M3D-LaMed towers use, assembled from MONAI's blocks as the official code does.

The LaMed vision tower (`multimodal_encoder/vit.py`: a ViT with a CLS token and no classification
head) and the SegVol image encoder (`monai.networks.nets.ViT`, classification=False) are both a
MONAI `PatchEmbeddingBlock` (perceptron patches), `TransformerBlock`s and a final LayerNorm, so
building the same tree from the same blocks gives the checkpoints' tensor names by construction
(`patch_embedding.patch_embeddings.1`, `blocks.N.attn.qkv`, `blocks.N.mlp.linear1`, ...).

Not `nets.ViT` itself: with `classification=True` it adds a head the checkpoint lacks (and returns
its logits), and its blocks take MONAI's einsum attention, 4x (full size) to 8x (tiny) slower on
CPU than the `scaled_dot_product_attention` path chosen here, which gives the same output to float
rounding (docs/m3d-lamed.md).
"""

from __future__ import annotations

from typing import Tuple

import torch
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from torch import nn


def transformer_block(hidden: int, mlp_dim: int, num_heads: int) -> TransformerBlock:
    """MONAI's block on the SDPA path, without the `norm_cross_attn` the checkpoints lack.

    MONAI >= 1.4 builds that LayerNorm even without cross-attention and never calls it then; the
    official checkpoints were saved with MONAI 1.3, which had none, so keeping it would make the
    strict name check fail (or leave 4 uninitialised tensors per block).
    """
    block = TransformerBlock(hidden, mlp_dim, num_heads, use_flash_attention=True)
    del block.norm_cross_attn
    return block


class ViT3D(nn.Module):
    """Returns the final-LayerNorm output (B, [1 +] N, hidden), CLS first when `cls_token`."""

    def __init__(
        self,
        in_channels: int,
        image_size: Tuple[int, int, int],
        patch_size: Tuple[int, int, int],
        hidden: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        cls_token: bool,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels, image_size, patch_size, hidden, num_heads, proj_type="perceptron", spatial_dims=3
        )
        self.blocks = nn.ModuleList(transformer_block(hidden, mlp_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden)
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x)
        if hasattr(self, "cls_token"):
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionTower(nn.Module):
    """`model.vision_tower`: the ViT nested as `.vision_tower` (official names); keeps patch tokens."""

    def __init__(self, vit: ViT3D) -> None:
        super().__init__()
        self.vision_tower = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(images)[:, 1:]

"""The MONAI-style 3D ViT both M3D-LaMed towers use, with MONAI's parameter names.

Both the LaMed vision tower (with a CLS token) and the SegVol image encoder (without) are MONAI
`ViT(pos_embed="perceptron")` in the official code; the checkpoints carry MONAI's names
(`patch_embedding.patch_embeddings.1`, `blocks.N.attn.qkv`, `blocks.N.mlp.linear1`, ...), so these
modules reproduce that tree exactly rather than depending on a MONAI version.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Patchify(nn.Module):
    """`b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)`: MONAI's perceptron patch order."""

    def __init__(self, patch_size: Tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p1, p2, p3 = self.patch_size
        x = x.reshape(b, c, d // p1, p1, h // p2, p2, w // p3, p3)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (d // p1) * (h // p2) * (w // p3), p1 * p2 * p3 * c)


class PatchEmbedding(nn.Module):
    def __init__(
        self,
        in_channels: int,
        image_size: Tuple[int, int, int],
        patch_size: Tuple[int, int, int],
        hidden: int,
    ):
        super().__init__()
        n_patches = 1
        patch_dim = in_channels
        for i, p in zip(image_size, patch_size):
            n_patches *= i // p
            patch_dim *= p
        self.patch_embeddings = nn.Sequential(Patchify(patch_size), nn.Linear(patch_dim, hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embeddings(x) + self.position_embeddings


class SelfAttention(nn.Module):
    """MONAI SABlock: fused qkv without bias, split as (qkv, heads, head_dim)."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, hidden * 3, bias=False)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, num_heads: int) -> None:
        super().__init__()
        self.mlp = MLP(hidden, mlp_dim)
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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
        self.patch_embedding = PatchEmbedding(in_channels, image_size, patch_size, hidden)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, mlp_dim, num_heads) for _ in range(num_layers))
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

"""EVA-ViT-g/14, the frozen MiniGPT-v2 image encoder, with the parameter names of `eva_vit_g.pth`.

Facts from Vision-CAIR/MiniGPT-Med@adb55c3 `minigpt4/models/eva_vit.py` (`create_eva_vit_g`):
pre-norm blocks without layer scale or relative position bias, LayerNorm eps 1e-6, exact GELU,
a bias-free `qkv` Linear plus separate `q_bias` / `v_bias` (the key gets no bias), absolute
position embeddings with a cls token, and no final norm: the output is the last block's tokens.
The checkpoint's 16x16 position grid is resized bicubically to the 448-pixel grid on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medmllm.engines.minigptmed.config import MiniGPTMedConfig

LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # Same scale (head_dim ** -0.5) and softmax as the official explicit matmul.
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """(B, 3, S, S) normalised image -> (B, 1 + (S/14)^2, width), cls token first."""

    def __init__(self, config: MiniGPTMedConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.image_size = config.image_size
        self.patch_embed = PatchEmbed(config.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))
        self.blocks = nn.ModuleList(
            Block(width, config.vision_heads, config.mlp_hidden) for _ in range(config.vision_depth)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"EVA-ViT expects {self.image_size}x{self.image_size} images, got {tuple(image.shape)}"
            )
        x = self.patch_embed(image)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + g*g, C) -> (1, 1 + num_patches, C): cls entry kept, the square grid resized
    bicubically (align_corners=False, in float32) as `eva_vit.py:interpolate_pos_embed` does."""
    old = pos_embed.shape[1] - 1
    old_side, new_side = round(old**0.5), round(num_patches**0.5)
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise ValueError(f"position embeddings must cover a square grid; got {old} and {num_patches} patches")
    if old_side == new_side:
        return pos_embed
    width = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, old_side, old_side, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((pos_embed[:, :1].float(), grid), dim=1)

"""`model.seg_module`: the SegVol-style mask decoder M3D-LaMed attaches to its `[SEG]` token.

Same tree and names as the official `segment_anything_volumetric` code (a SAM decoder made 3D):
its own ViT image encoder, a prompt encoder of which only the text path is used (the point / box /
mask parts still exist because the checkpoints carry their tensors), a two-way transformer, the
upscaling head and the text-alignment layer that adds a text-voxel similarity to the mask.
The image encoder is MONAI's ViT (`vit3d.ViT3D`, as in the official `build_sam.py`); the rest is
plain torch in the official code too (SAM's, no MONAI blocks), so it is written out here.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from medmllm.engines.m3d.vit3d import ViT3D


class LayerNorm2d(nn.Module):
    """SAM's channel LayerNorm; only present so the unused mask-prompt tensors load."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_feats)))

    def forward(self, size: Tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding (C, D, H, W); coordinates stacked (H, D, W) exactly as the official code does."""
        matrix = self.positional_encoding_gaussian_matrix
        grid = torch.ones(size, device=matrix.device, dtype=matrix.dtype)
        a = (grid.cumsum(0) - 0.5) / size[0]
        b = (grid.cumsum(1) - 0.5) / size[1]
        c = (grid.cumsum(2) - 0.5) / size[2]
        coords = (2 * torch.stack([b, a, c], dim=-1) - 1) @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(3, 0, 1, 2)


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int, embedding_size: Tuple[int, int, int], mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embedding_size = tuple(embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def forward(self, text_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text only (as M3D calls it): sparse = the text token, dense = the no-mask embedding."""
        sparse = text_embedding.unsqueeze(1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1)
        dense = dense.expand(text_embedding.shape[0], -1, *self.embedding_size)
        return sparse, dense

    def dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.embedding_size).unsqueeze(0)


class Attention(nn.Module):
    """SAM attention with an optional internal downscale (cross-attention uses half width)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal = dim // downsample_rate
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class HeadMLP(nn.Module):
    """SAM's `MLP` (ReLU between layers), stored as `layers.N`."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        outs = [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    num_mask_tokens = 4  # 3 multimask outputs + 1; M3D uses only the first (multimask_output=False)

    def __init__(self, dim: int, mlp_dim: int, feat_shape: Tuple[int, int, int]) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(2, dim, 8, mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        up = tuple(2 * f for f in feat_shape)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            nn.LayerNorm((dim // 4, *up)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            HeadMLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = HeadMLP(dim, 256, self.num_mask_tokens, 3)
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """Low-resolution logits (B, 1, 4*D/p, 4*H/p, 4*W/p) of the first mask token plus text similarity."""
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = image.expand(tokens.shape[0], -1, -1, -1, -1) + dense
        b, c, d, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, d, h, w))
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])
        _, c2, d2, h2, w2 = upscaled.shape
        flat = upscaled.reshape(b, c2, d2 * h2 * w2)
        masks = (hyper.unsqueeze(1) @ flat).reshape(b, 1, d2, h2, w2)
        sim = (self.txt_align_upscaled_embedding(text).unsqueeze(1) @ flat).reshape(b, 1, d2, h2, w2)
        return masks + sim


class SegVol(nn.Module):
    """`image_encoder` + `prompt_encoder` + `mask_decoder`; logits at the full model grid."""

    def __init__(
        self,
        image_size: Tuple[int, int, int],
        patch_size: Tuple[int, int, int],
        dim: int,
        vit_mlp_dim: int,
        vit_layers: int,
        vit_heads: int,
        decoder_mlp_dim: int,
    ) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        self.feat_shape = tuple(i // p for i, p in zip(image_size, patch_size))
        self.image_encoder = ViT3D(
            1, image_size, patch_size, dim, vit_mlp_dim, vit_layers, vit_heads, cls_token=False
        )
        self.prompt_encoder = PromptEncoder(dim, self.feat_shape)
        self.mask_decoder = MaskDecoder(dim, decoder_mlp_dim, self.feat_shape)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image embedding (B, C, D/p, H/p, W/p): once per volume, reused by every [SEG]."""
        x = self.image_encoder(image)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.feat_shape)

    def decode(self, embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, 1, *image_size), trilinear from the 4x-upscaled decoder output."""
        sparse, dense = self.prompt_encoder(text_embedding)
        low = self.mask_decoder(embedding, text_embedding, self.prompt_encoder.dense_pe(), sparse, dense)
        return F.interpolate(low, size=self.image_size, mode="trilinear", align_corners=False)

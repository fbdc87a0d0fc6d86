"""`model.mm_projector`: the official spatial-pooling projector (2048 patches -> 256 tokens)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class SpatialPoolingProjector(nn.Module):
    """Patch tokens -> (C, 8, 16, 16) -> avg_pool3d -> D-major tokens -> MLP to the LM width.

    The MLP is `Linear, (GELU, Linear) * (layers - 1)`, stored as `projector.{0,2,...}` like the
    official `nn.Sequential`.
    """

    def __init__(self, grid: Tuple[int, int, int], in_dim: int, out_dim: int, layers: int, pool: int) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.pool = pool
        modules = [nn.Linear(in_dim, out_dim)]
        for _ in range(1, layers):
            modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.projector = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *self.grid)
        x = F.avg_pool3d(x, kernel_size=self.pool, stride=self.pool)
        return self.projector(x.flatten(2).transpose(1, 2))

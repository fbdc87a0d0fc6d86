"""M3D-LaMed engine: our own implementation that loads the official checkpoints (no remote code)."""

from __future__ import annotations

from medmllm.engines.m3d.engine import M3DEngine, load_demo_npy

ENGINE = M3DEngine

__all__ = ["ENGINE", "M3DEngine", "load_demo_npy"]

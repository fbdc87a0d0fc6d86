"""MiniGPT-Med engine: our own MiniGPT-v2 implementation that loads the official checkpoint files."""

from __future__ import annotations

from medmllm.engines.minigptmed.engine import MiniGPTMedEngine

ENGINE = MiniGPTMedEngine

__all__ = ["ENGINE", "MiniGPTMedEngine"]

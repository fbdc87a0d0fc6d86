"""medmllm: the pure-Python core of MedMLLMSlicer.

Never imports Slicer, Qt or MRML, so the same code runs in the server, the CLI and inside Slicer.
"""

__version__ = "0.1.0"

"""Slicer-side pieces of MedMLLMSlicer: chat panel (Qt), scene writer (MRML), backends, worker.

`medmllm` (the pure-Python core) knows nothing of Slicer; everything here may import `qt` and
`slicer`, but only inside Slicer or under the test fakes.
"""

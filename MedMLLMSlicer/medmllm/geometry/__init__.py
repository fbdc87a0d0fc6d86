"""Volume geometry: voxel grids, IJK <-> RAS <-> LPS, boxes and ROIs, model-grid and slice mappings.

Only numpy is needed to import this package; SimpleITK, torch and PIL load inside the functions
that use them.
"""

from medmllm.geometry.boxes import IJKBox, RoiRAS
from medmllm.geometry.volume import Volume, VolumeError

__all__ = ["IJKBox", "RoiRAS", "Volume", "VolumeError"]

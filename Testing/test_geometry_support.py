"""Hypothesis strategies shared by the geometry tests: random oblique, flipped, anisotropic grids."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

spacings = st.tuples(*[st.floats(0.2, 5.0)] * 3)
origins = st.tuples(*[st.floats(-500.0, 500.0)] * 3)
flips = st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3)


def rotation_from_quaternion(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


quaternions = st.tuples(*[st.floats(-1.0, 1.0)] * 4).filter(lambda q: sum(v * v for v in q) > 0.1)


def compose(rotation: np.ndarray, flip, spacing, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation @ np.diag(np.array(flip) * np.array(spacing))
    m[:3, 3] = origin
    return m


@st.composite
def oblique_grids(draw) -> np.ndarray:
    """IJK->RAS with a random rotation, random axis flips and anisotropic spacing."""
    return compose(rotation_from_quaternion(draw(quaternions)), draw(flips), draw(spacings), draw(origins))


@st.composite
def aligned_grids(draw) -> np.ndarray:
    """IJK->RAS whose axes are a random permutation of the patient axes, flipped at random."""
    permutation = draw(st.permutations([0, 1, 2]))
    return compose(np.eye(3)[:, permutation], draw(flips), draw(spacings), draw(origins))


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12))

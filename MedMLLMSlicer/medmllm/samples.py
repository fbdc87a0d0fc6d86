"""Sample data: real volumes (and deepbet's weights) read out of registry wheels, and phantoms
with known anatomy.

Nothing large is vendored: `fetch_asset` runs `pip download --no-deps` of a pinned wheel into the
medmllm cache once, then reads the one file it needs out of the wheel (a zip). Each asset carries
its source and licence, read back from the wheel's own metadata so the demo can print them.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np


class SampleError(RuntimeError):
    """A sample could not be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class WheelAsset:
    dist: str
    version: str
    member: str  # path inside the wheel
    description: str
    terms: str  # licence of the data itself where it differs from the package's

    @property
    def filename(self) -> str:
        return f"{self.dist}-{self.version}-{Path(self.member).name}"


MNI_T1 = WheelAsset(
    "nilearn",
    "0.14.1",
    "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "MNI ICBM152 2009a symmetric T1 brain MRI template, 1 mm",
    "MNI ICBM152 template (c) McConnell Brain Imaging Centre, free use with attribution "
    "(Fonov et al., NeuroImage 2011); shipped by nilearn",
)
MNI_GM = WheelAsset(
    "nilearn",
    "0.14.1",
    "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "MNI ICBM152 grey-matter probability map (checks the brain mask)",
    MNI_T1.terms,
)
MNI_WM = WheelAsset(
    "nilearn",
    "0.14.1",
    "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "MNI ICBM152 white-matter probability map (checks the brain mask)",
    MNI_T1.terms,
)
DEEPBET_MODEL = WheelAsset("deepbet", "1.0.2", "data/models/model.pt", "deepbet brain-extraction network", "")
DEEPBET_BBOX = WheelAsset(
    "deepbet", "1.0.2", "data/models/bbox_model.pt", "deepbet brain bounding-box network", ""
)


def cache_dir() -> Path:
    """`$MEDMLLM_CACHE`, else ~/.cache/medmllm."""
    return Path(os.environ.get("MEDMLLM_CACHE") or Path.home() / ".cache" / "medmllm")


def _wheel_path(asset: WheelAsset) -> Optional[Path]:
    wheels = sorted((cache_dir() / "wheels").glob(f"{asset.dist}-{asset.version}-*.whl"))
    return wheels[0] if wheels else None


def _installed_file(asset: WheelAsset) -> Optional[Path]:
    try:
        dist = importlib.metadata.distribution(asset.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == asset.member:
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None


def find_asset(asset: WheelAsset) -> Optional[Path]:
    """Local path of the asset, from an installed package or the cached wheel; never downloads."""
    installed = _installed_file(asset)
    if installed is not None:
        return installed
    target = cache_dir() / "assets" / asset.filename
    if target.is_file():
        return target
    wheel = _wheel_path(asset)
    if wheel is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(asset.member)
        except KeyError:
            raise SampleError(f"{wheel.name} has no {asset.member}; delete it and fetch again") from None
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def fetch_asset(asset: WheelAsset) -> Path:
    """Like `find_asset`, but downloads the pinned wheel (no dependencies) from the package index first."""
    found = find_asset(asset)
    if found is not None:
        return found
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--ignore-requires-python", "-d", str(wheels), f"{asset.dist}=={asset.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SampleError(
            f"could not download {asset.dist}=={asset.version} from the package index: {tail[0]}"
        )
    found = find_asset(asset)
    if found is None:
        raise SampleError(f"{asset.dist}=={asset.version} downloaded but {asset.member} is missing")
    return found


def licence_of(asset: WheelAsset) -> str:
    """The licence field of the package metadata (installed or cached wheel), plus the data terms."""
    meta = None
    try:
        meta = importlib.metadata.metadata(asset.dist)
    except importlib.metadata.PackageNotFoundError:
        wheel = _wheel_path(asset)
        if wheel is not None:
            meta = _wheel_metadata(wheel)
    package = "unknown"
    if meta is not None:
        package = meta.get("License-Expression") or meta.get("License") or "unknown"
    terms = f"; data: {asset.terms}" if asset.terms else ""
    return f"package {asset.dist} {asset.version} licence: {package.strip()}{terms}"


def _wheel_metadata(wheel: Path):
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode("utf-8"), headersonly=True)


# Chest phantom in RAS mm (patient centred at the origin); tests compare against these shapes.
BODY_SEMI_AXES = (150.0, 100.0)  # elliptic cylinder along S: R-L, A-P
LUNG_CENTRES = ((70.0, 0.0, 20.0), (-70.0, 0.0, 20.0))  # right (+x), left (-x)
LUNG_SEMI_AXES = (45.0, 60.0, 90.0)
TRACHEA = (0.0, 10.0, 8.0, 60.0)  # x, y, radius, lowest S; runs up to the top of the volume
SPINE = (0.0, -70.0, 15.0)  # x, y, radius; full length
HU = {"air": -1000.0, "body": 40.0, "lung": -850.0, "trachea": -1000.0, "bone": 700.0}


def chest_ct_phantom(
    shape: Sequence[int], ijk_to_ras: np.ndarray, noise_hu: float = 10.0, seed: int = 0, dtype=np.int16
):
    """Synthetic chest CT (a `Volume`) with analytic anatomy: body, two lungs, trachea, spine.

    Built slice by slice in RAS coordinates, so any (flipped, oblique) `ijk_to_ras` gives the same
    patient; works at 512x512x300 without holding coordinate arrays for the whole volume.
    """
    from medmllm.geometry.volume import Volume

    m = np.asarray(ijk_to_ras, float)
    nk, nj, ni = (int(s) for s in shape)
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    rng = np.random.default_rng(seed)
    out = np.empty((nk, nj, ni), dtype=dtype)
    for k in range(nk):
        x, y, z = (m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * k + m[r, 3] for r in range(3))
        out[k] = _chest_slice(x, y, z, rng, noise_hu)
    return Volume(out, m)


def _chest_slice(x, y, z, rng, noise_hu: float) -> np.ndarray:
    hu = np.full(x.shape, HU["air"], np.float32)
    hu[(x / BODY_SEMI_AXES[0]) ** 2 + (y / BODY_SEMI_AXES[1]) ** 2 <= 1.0] = HU["body"]
    for cx, cy, cz in LUNG_CENTRES:
        a, b, c = LUNG_SEMI_AXES
        hu[((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0] = HU["lung"]
    tx, ty, tr, tz = TRACHEA
    hu[((x - tx) ** 2 + (y - ty) ** 2 <= tr**2) & (z >= tz)] = HU["trachea"]
    sx, sy, sr = SPINE
    hu[(x - sx) ** 2 + (y - sy) ** 2 <= sr**2] = HU["bone"]
    if noise_hu > 0:
        hu += rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    return np.round(hu)


# Head MRI phantom: brain sphere, dark skull shell, bright scalp shell (T1-like), RAS mm.
HEAD_RADII = {"brain": 60.0, "skull_outer": 70.0, "scalp_outer": 76.0}
MR_INTENSITY = {"background": 0.0, "brain": 100.0, "skull": 0.0, "scalp": 80.0}  # bone: signal void on T1


def head_mr_phantom(
    shape: Sequence[int], ijk_to_ras: np.ndarray, centre: Tuple[float, float, float] = (0, 0, 0)
):
    """Synthetic T1-like head (a `Volume`, float32) centred at `centre` RAS."""
    from medmllm.geometry.volume import Volume

    m = np.asarray(ijk_to_ras, float)
    k, j, i = np.indices(tuple(int(s) for s in shape), dtype=np.float32)
    r2 = sum((m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] - centre[r]) ** 2 for r in range(3))
    out = np.full(r2.shape, MR_INTENSITY["background"], np.float32)
    out[r2 <= HEAD_RADII["scalp_outer"] ** 2] = MR_INTENSITY["scalp"]
    out[r2 <= HEAD_RADII["skull_outer"] ** 2] = MR_INTENSITY["skull"]
    out[r2 <= HEAD_RADII["brain"] ** 2] = MR_INTENSITY["brain"]
    return Volume(out, m)


SAMPLE_ASSETS = (MNI_T1, MNI_GM, MNI_WM, DEEPBET_MODEL, DEEPBET_BBOX)

if __name__ == "__main__":
    for _asset in SAMPLE_ASSETS:
        print(f"[samples] {_asset.description}: {fetch_asset(_asset)}")

"""Sample data: real volumes (and deepbet's weights) read out of registry packages, and phantoms
with known anatomy.

Nothing large is vendored: `fetch_asset` runs `pip download --no-deps` of a pinned wheel into the
medmllm cache once, then reads the one file it needs out of the wheel (a zip). Each asset carries
its source and licence, read back from the wheel's own metadata so the demo can print them.

Real CT/MR scans with reference segmentations come from two pinned source distributions
(TotalSegmentator 2.18.0, pyradiomics 3.0.1; sha256-checked), unpacked once by
`python -m medmllm.samples` (scripts/setup runs it); `real_scan(name)` then finds them offline and
never downloads.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

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
# Solid bone at cortical density: a solid block at contrast-blood density (350-1000 HU) would be
# taken for a vessel lumen by the CT tools, as it should be.
HU = {"air": -1000.0, "body": 40.0, "lung": -850.0, "trachea": -1000.0, "bone": 1100.0}


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


@dataclass(frozen=True)
class Sdist:
    """A pinned source distribution on PyPI and the members of it that the samples use."""

    dist: str
    version: str
    sha256: str
    licence: str  # checked against the licence file inside the sdist
    attribution: str
    members: Tuple[str, ...]  # paths (files or folder prefixes) relative to the sdist's top folder

    @property
    def filename(self) -> str:
        return f"{self.dist}-{self.version}.tar.gz"

    @property
    def folder(self) -> Path:
        """Where the members are unpacked: <cache>/real/<dist>-<version>/."""
        return cache_dir() / "real" / f"{self.dist}-{self.version}"


_TS_REF = "tests/reference_files/"
TOTALSEG_SDIST = Sdist(
    "totalsegmentator",
    "2.18.0",
    "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    "Apache-2.0 (LICENSE in the sdist); images from the TotalSegmentator data set",
    "Wasserthal J, Breit H-C, Meyer MT, et al. TotalSegmentator: robust segmentation of 104 anatomic "
    "structures in CT images. Radiology: Artificial Intelligence 2023;5(5):e230024",
    (
        "LICENSE",
        "totalsegmentator/map_to_binary.py",
        _TS_REF + "aorta_report/example_ct.nii.gz",
        _TS_REF + "example_ct.nii.gz",
        _TS_REF + "example_ct_sm.nii.gz",
        _TS_REF + "example_seg.nii.gz",
        _TS_REF + "example_seg_fast",  # .nii.gz, _force_split, _body_seg and the per-structure folder
        _TS_REF + "example_ct_dicom/",
        _TS_REF + "example_seg_dicom.nii.gz",
        _TS_REF + "example_mr_sm.nii.gz",
        _TS_REF + "example_seg_mr.nii.gz",
        _TS_REF + "example_seg_roi_subset",  # .nii.gz (CT) and _mr.nii.gz: roi_subset liver + brain
    ),
)
PYRADIOMICS_SDIST = Sdist(
    "pyradiomics",
    "3.0.1",
    "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
    "BSD-3-Clause (LICENSE.txt in the sdist, Copyright 2017 Harvard Medical School)",
    "van Griethuysen JJM, Fedorov A, Parmar C, et al. Computational Radiomics System to Decode the "
    "Radiographic Phenotype. Cancer Research 2017;77(21):e104-e107 (pyradiomics test data)",
    (
        "LICENSE.txt",
        "data/lung1_image.nrrd",
        "data/lung1_label.nrrd",
        "data/lung2_image.nrrd",
        "data/lung2_label.nrrd",
    ),
)
REAL_SDISTS = (TOTALSEG_SDIST, PYRADIOMICS_SDIST)


@dataclass(frozen=True)
class RealScan:
    """One real scan inside a pinned sdist, with the segmentation shipped beside it (if any).

    `reference_map` names the `class_map` entry of TotalSegmentator's map_to_binary.py that numbers
    the reference's labels ("total" for CT, "total_mr" for MR); None when the reference is not a
    TotalSegmentator output (pyradiomics ships a tumour label only). `reference_mm` is the isotropic
    voxel size the reference's model segmented at (3 mm with `--fast`, 1.5 mm without), from the
    command that made it (tests/update_test_files.sh, wasserth/TotalSegmentator@00064a1): a
    reference made on a coarser grid than the scan's has that grid's blocky boundary.
    """

    name: str
    description: str
    modality: str
    sdist: Sdist
    image: str
    reference: Optional[str]
    reference_map: Optional[str]
    reference_mm: Optional[float] = None

    @property
    def image_path(self) -> Path:
        return _unpacked(self.sdist, self.image)

    @property
    def reference_path(self) -> Optional[Path]:
        return _unpacked(self.sdist, self.reference) if self.reference else None

    @property
    def attribution(self) -> str:
        return f"{self.sdist.dist} {self.sdist.version} sdist, {self.sdist.licence}; {self.sdist.attribution}"


REAL_SCANS: Dict[str, RealScan] = {
    s.name: s
    for s in (
        RealScan(
            "chest-ct",
            "contrast chest CT, 233x167x191 at 1.5 mm (lungs, heart, aorta, upper abdomen)",
            "CT",
            TOTALSEG_SDIST,
            _TS_REF + "aorta_report/example_ct.nii.gz",
            None,  # the sdist carries only aorta-report outputs for this scan, no whole-body segmentation
            None,
        ),
        RealScan(
            "abdomen-ct",
            "abdomen/pelvis CT with the lung bases, 122x101x112 at 3 mm",
            "CT",
            TOTALSEG_SDIST,
            _TS_REF + "example_ct.nii.gz",
            _TS_REF + "example_seg_fast_force_split.nii.gz",
            "total",
            3.0,  # --fast
        ),
        RealScan(
            "abdomen-ct-crop",
            "30-slice crop of the abdomen CT (upper abdomen, lung bases), 122x101x30 at 3 mm",
            "CT",
            TOTALSEG_SDIST,
            _TS_REF + "example_ct_sm.nii.gz",
            _TS_REF + "example_seg.nii.gz",
            "total",
            1.5,
        ),
        RealScan(
            "ct-dicom",
            "DICOM series, 20 slices 512x512 at 0.98x0.98x2 mm (JPEG2000-lossless)",
            "CT",
            TOTALSEG_SDIST,
            _TS_REF + "example_ct_dicom",
            _TS_REF + "example_seg_dicom.nii.gz",
            "total",
            3.0,  # --fast
        ),
        RealScan(
            "abdomen-mr",
            "abdominal MR, 117x91x20 at 3 mm",
            "MR",
            TOTALSEG_SDIST,
            _TS_REF + "example_mr_sm.nii.gz",
            _TS_REF + "example_seg_mr.nii.gz",
            "total_mr",
        ),
        RealScan(
            "lung1-ct",
            "chest CT, 512x512x48 at about 0.6x0.6x5 mm, with a tumour label",
            "CT",
            PYRADIOMICS_SDIST,
            "data/lung1_image.nrrd",
            "data/lung1_label.nrrd",
            None,
        ),
        RealScan(
            "lung2-ct",
            "chest CT, 512x512x61 at about 0.6x0.6x5 mm, with a tumour label",
            "CT",
            PYRADIOMICS_SDIST,
            "data/lung2_image.nrrd",
            "data/lung2_label.nrrd",
            None,
        ),
    )
}


def real_scan(name: str) -> RealScan:
    """The named real scan; its paths raise `SampleError` (saying how to fetch) until set-up ran."""
    try:
        return REAL_SCANS[name]
    except KeyError:
        raise SampleError(f"no real scan called {name!r}; known: {', '.join(REAL_SCANS)}") from None


def label_map(task: str = "total") -> Dict[int, str]:
    """{label number: structure name} of a TotalSegmentator task, read (not imported) from the
    sdist's map_to_binary.py so the reference segmentations are decoded by their own release."""
    source = _unpacked(TOTALSEG_SDIST, "totalsegmentator/map_to_binary.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "class_map" for t in node.targets):
            maps = ast.literal_eval(node.value)
            if task not in maps:
                raise SampleError(f"TotalSegmentator has no task {task!r}; known: {', '.join(maps)}")
            return {int(k): str(v) for k, v in maps[task].items()}
    raise SampleError("map_to_binary.py holds no class_map; the sdist is not the pinned release")


# Reference structures as unions of TotalSegmentator "total" labels (names from map_to_binary.py).
_BONE_PREFIXES = ("vertebrae_", "rib_", "sacrum", "hip_", "femur_", "humerus_", "scapula_", "clavicula_")
_BONE_PREFIXES += ("sternum", "skull")
REFERENCE_GROUPS = {
    "Lungs": lambda name: name.startswith("lung_"),
    "Right lung": lambda name: name.startswith("lung_") and name.endswith("_right"),
    "Left lung": lambda name: name.startswith("lung_") and name.endswith("_left"),
    "Trachea": lambda name: name == "trachea",
    "Bone": lambda name: name.startswith(_BONE_PREFIXES),
}


def load_real_scan(scan: RealScan):
    """The scan as a `Volume` (NIfTI, NRRD or the DICOM folder)."""
    from medmllm.geometry.volume import Volume

    return Volume.from_file(scan.image_path)


def reference_mask(scan: RealScan, group: str, volume) -> np.ndarray:
    """Boolean [k, j, i] mask of a `REFERENCE_GROUPS` structure on `volume`'s grid.

    The reference is put on the grid by physical position (nearest label), since a shipped
    segmentation may store the same grid with other axis directions (the DICOM one is flipped in j)."""
    from medmllm.anatomy.nifti import labels_on_grid

    if scan.reference_path is None or scan.reference_map is None:
        raise SampleError(f"{scan.name} has no TotalSegmentator reference segmentation")
    wanted = [n for n, name in label_map(scan.reference_map).items() if REFERENCE_GROUPS[group](name)]
    return np.isin(labels_on_grid(scan.reference_path, volume), wanted)


def _unpacked(sdist: Sdist, member: str) -> Path:
    path = sdist.folder / member
    if not path.exists():
        raise SampleError(
            f"{member} of the {sdist.dist} {sdist.version} sdist is not in the sample cache "
            f"({sdist.folder}); run `python -m medmllm.samples` (scripts/setup does) once, online"
        )
    return path


def fetch_sdist(sdist: Sdist) -> Path:
    """Download the pinned sdist (sha256-checked) and unpack its members; a no-op once done."""
    stamp = sdist.folder / ".complete"
    content = "\n".join((sdist.sha256, *sdist.members)) + "\n"  # a new member list unpacks again
    if stamp.is_file() and stamp.read_text() == content:
        return sdist.folder
    archive = cache_dir() / "sdists" / sdist.filename
    if not archive.is_file() or _sha256(archive) != sdist.sha256:
        _pip_download_sdist(sdist, archive.parent)
    digest = _sha256(archive)
    if digest != sdist.sha256:
        archive.unlink()
        raise SampleError(f"{sdist.filename}: sha256 {digest} is not the pinned {sdist.sha256}; deleted")
    _unpack(sdist, archive)
    stamp.write_text(content)
    return sdist.folder


def _pip_download_sdist(sdist: Sdist, folder: Path) -> None:
    # --no-build-isolation: pip prepares the sdist's metadata with this environment's setuptools and
    # numpy (pyradiomics' setup.py imports numpy, which an isolated build lacks).
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--no-build-isolation", "-d", str(folder), f"{sdist.dist}=={sdist.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (folder / sdist.filename).is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SampleError(f"could not download the {sdist.dist}=={sdist.version} sdist: {tail[0]}")


def _unpack(sdist: Sdist, archive: Path) -> None:
    """Extract only the listed members (regular files, fixed names: no path tricks possible)."""
    top = f"{sdist.dist}-{sdist.version}/"
    partial = sdist.folder.with_name(sdist.folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar.getmembers():
            inner = info.name[len(top) :] if info.name.startswith(top) else ""
            if not info.isfile() or ".." in Path(inner).parts or not inner.startswith(sdist.members):
                continue
            target = partial / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(info) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
    missing = [m for m in sdist.members if not (partial / m).exists() and not any(partial.glob(m + "*"))]
    if missing:
        raise SampleError(f"{archive.name} lacks {', '.join(missing)}; it is not the pinned release")
    shutil.rmtree(sdist.folder, ignore_errors=True)
    partial.replace(sdist.folder)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


if __name__ == "__main__":
    for _asset in SAMPLE_ASSETS:
        print(f"[samples] {_asset.description}: {fetch_asset(_asset)}")
    for _sdist in REAL_SDISTS:
        print(f"[samples] real scans from the {_sdist.dist} {_sdist.version} sdist: {fetch_sdist(_sdist)}")

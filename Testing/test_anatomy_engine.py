"""The built-in engine with TotalSegmentator, over a real server, on the sdist's real scans.

Only TotalSegmentator's network inference is replaced, by `totalseg_double` (checked against the
installed entry point's signature; answers with the sdist's real outputs). Everything else runs:
question routing in English and Chinese, the child process, the label cache in the server's
store, the grid mapping, measurements, `.seg.nrrd` with terminology, ROIs, the report.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import SimpleITK as sitk
from medmllm import samples
from medmllm.anatomy.runner import NOT_INSTALLED
from medmllm.engines.base import ChatContext, ChatTurn, EngineError, EngineOptions, MaskOut, TokenOut
from medmllm.engines.builtin import BuiltinEngine
from medmllm.io.markups import read_roi_json
from medmllm.io.segnrrd import read_seg_nrrd

DOUBLE = {"anatomy_entry": "totalseg_double:totalsegmentator", "anatomy_device": "cpu"}
REF = samples.TOTALSEG_SDIST.folder / "tests" / "reference_files"
QUESTIONS = [  # (question, segment name, TotalSegmentator class)
    ("show me the liver", "Liver", "liver"),
    ("where is the left kidney?", "Left kidney", "kidney_left"),
    ("how big is the spleen?", "Spleen", "spleen"),
    ("显示肝脏", "Liver", "liver"),
    ("左肾在哪里", "Left kidney", "kidney_left"),
    ("脾脏多大", "Spleen", "spleen"),
]


def reference(file_name: str, class_name: str, volume, task: str = "total") -> np.ndarray:
    """TotalSegmentator's own output for one class, on the volume's grid by physical position."""
    number = next(n for n, name in samples.label_map(task).items() if name == class_name)
    on_grid = sitk.Resample(
        sitk.ReadImage(str(REF / file_name)), volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    return sitk.GetArrayFromImage(on_grid) == number


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def crop():
    return samples.load_real_scan(samples.real_scan("abdomen-ct-crop"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One engine and one store for the module: TotalSegmentator runs once per volume."""
    return BuiltinEngine(EngineOptions(extra=dict(DOUBLE))), tmp_path_factory.mktemp("store")


def ask(serve, shared, volume, question, tmp_path):
    engine, store = shared
    client = serve(engine=engine, store=store).client()
    volume_id = client.ensure_volume(volume.voxels, volume.ijk_to_ras)
    events = list(client.chat(volume_id, question))
    text = "".join(e["text"] for e in events if e["type"] == "token")
    return client, events, text


@pytest.mark.parametrize(("question", "name", "class_name"), QUESTIONS)
def test_done_when_questions_on_the_real_scan(serve, shared, crop, tmp_path, question, name, class_name):
    client, events, text = ask(serve, shared, crop, question, tmp_path)
    truth = reference("example_seg_fast.nii.gz", class_name, crop)  # --fast --ml: what CPU runs
    assert not [e for e in events if e["type"] in ("error", "warning")], events
    if "where" in question or "哪里" in question:
        box = next(e for e in events if e["type"] == "box")
        hits = [np.flatnonzero(truth.any(axis=a)) for a in ((0, 1), (0, 2), (1, 2))]  # i, j, k
        assert box["label"] == name
        assert box["voxels"] == {
            "min": [int(h[0]) for h in hits],
            "max": [int(h[-1]) for h in hits],
        }
        roi = read_roi_json(client.download(box["url"], tmp_path / box["file"]))
        assert roi is not None and "patient's left side" in text
        return
    mask = next(e for e in events if e["type"] == "mask")
    segments, matrix = read_seg_nrrd(client.download(mask["url"], tmp_path / "seg.seg.nrrd"))
    (segment,) = segments
    assert segment.name == name and np.allclose(matrix, crop.ijk_to_ras)
    assert "SCT^" in segment.terminology and segment.terminology.count("~") == 6
    assert mask["terminology"] == segment.terminology  # the event carries it to Slicer too
    assert dice(segment.mask, truth) >= 0.99
    voxel_ml = abs(np.linalg.det(crop.ijk_to_ras[:3, :3])) / 1000.0
    assert mask["volume_ml"] == pytest.approx(truth.sum() * voxel_ml, rel=0.01)
    assert f"{mask['volume_ml']:.1f} mL" in text


def test_dicom_series_with_its_flipped_reference_grid(serve, shared, tmp_path):
    """example_seg_dicom.nii.gz is stored with j flipped against the DICOM series."""
    volume = samples.load_real_scan(samples.real_scan("ct-dicom"))
    client, events, _ = ask(serve, shared, volume, "show me the liver", tmp_path)
    mask = next(e for e in events if e["type"] == "mask")
    (segment,), _ = read_seg_nrrd(client.download(mask["url"], tmp_path / "seg.seg.nrrd"))
    assert dice(segment.mask, reference("example_seg_dicom.nii.gz", "liver", volume)) >= 0.99


def test_kidneys_sit_on_the_patients_sides(shared, crop):
    events = _chat(shared[0], crop, "show me the kidneys")
    masks = {e.label: e.mask for e in events if isinstance(e, MaskOut)}
    x = {
        name: (crop.ijk_to_ras @ np.r_[np.argwhere(m).mean(axis=0)[::-1], 1.0])[0]
        for name, m in masks.items()
    }
    assert x["Right kidney"] > 0 > x["Left kidney"]  # RAS: +x is the patient's right


def test_report_lists_organ_volumes_once_totalsegmentator_ran(shared, crop):
    _chat(shared[0], crop, "how big is the liver?")
    report = next(e for e in _chat(shared[0], crop, "report") if hasattr(e, "markdown")).markdown
    liver_ml = (
        reference("example_seg_fast.nii.gz", "liver", crop).sum()
        * abs(np.linalg.det(crop.ijk_to_ras[:3, :3]))
        / 1000
    )
    row = re.search(r"\| Liver \(TotalSegmentator\) \| ([\d.]+) \|", report)
    assert row and float(row.group(1)) == pytest.approx(liver_ml, abs=0.05)
    assert "Left kidney (TotalSegmentator)" in report and "Wasserthal" in report


def test_refuses_politely_without_weights_or_network(tmp_path, monkeypatch, crop):
    """The real entry point, no weights in its folder, no download allowed: one sentence, no run;
    the engine's own tools still answer what they know."""
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "no-weights"))
    engine = BuiltinEngine(EngineOptions(extra={"anatomy_device": "cpu"}))
    engine.use_store(tmp_path / "store")
    events = _chat(engine, crop, "show me the liver")
    text = _text(events)
    assert "weights" in text and "anatomy_download=yes" in text
    assert not [e for e in events if isinstance(e, MaskOut)]
    events = _chat(engine, crop, "show me the lungs")
    assert "weights" in _text(events) and [e.label for e in events if isinstance(e, MaskOut)]


def test_without_the_extra_it_says_what_is_missing(monkeypatch, crop):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "totalsegmentator" else real(n, *a)
    )
    engine = BuiltinEngine(EngineOptions())
    for question in ("show me the liver", "左肾在哪里"):
        assert NOT_INSTALLED in _text(_chat(engine, crop, question))


@pytest.mark.parametrize(
    "extra", [{"anatomy": "maybe"}, {"anatomy_device": "tpu"}, {"anatomy_download": "perhaps"}]
)
def test_bad_options_are_clear_errors(extra):
    with pytest.raises(EngineError, match=next(iter(extra))):
        BuiltinEngine(EngineOptions(extra=extra))


def _chat(engine, volume, question):
    ctx = ChatContext(volume, volume.sha256(), [ChatTurn("user", question)])
    return list(engine.chat(ctx, threading.Event()))


def _text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenOut))


def test_mr_at_full_resolution_asks_a_roi_subset(tmp_path):
    """total_mr on the sdist's abdominal MR; one organ at full resolution runs as roi_subset."""
    volume = samples.load_real_scan(samples.real_scan("abdomen-mr"))
    extra = dict(DOUBLE, anatomy_fast="no")
    engine = BuiltinEngine(EngineOptions(extra=extra))
    engine.use_store(tmp_path)
    (mask,) = [e for e in _chat(engine, volume, "显示肝脏") if isinstance(e, MaskOut)]
    truth = reference("example_seg_roi_subset_mr.nii.gz", "liver", volume, task="total_mr")
    assert mask.label == "Liver" and dice(mask.mask, truth) >= 0.99

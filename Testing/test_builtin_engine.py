"""The built-in engine end to end: events streamed for each kind of question, cancel, caching."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from engine_contract import EngineCase
from medmllm import samples
from medmllm.engines.base import (
    BoxOut,
    ChatContext,
    ChatTurn,
    EngineError,
    EngineOptions,
    MaskOut,
    ReportOut,
    TokenOut,
)
from medmllm.engines.builtin import NOT_AN_LLM, BuiltinEngine
from medmllm.engines.registry import create_engine, engine_names

CT_SHAPE = (100, 88, 128)


def _centred(spacing, shape, flip=(1, 1, 1)) -> np.ndarray:
    m = np.diag([*(s * f for s, f in zip(spacing, flip)), 1.0])
    m[:3, 3] = -m[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2)
    return m


@pytest.fixture(scope="module")
def ct():
    return samples.chest_ct_phantom(CT_SHAPE, _centred((2.5, 2.5, 3.0), CT_SHAPE, flip=(-1, -1, 1)))


@pytest.fixture(scope="module")
def mr():
    shape = (64, 64, 64)
    return samples.head_mr_phantom(shape, _centred((2.5, 2.5, 2.5), shape))


@pytest.fixture(scope="module")
def engine():
    return BuiltinEngine(EngineOptions(extra={"brain_method": "classical"}))


def _ask(engine, volume, question, volume_id="v", cancel=None):
    ctx = ChatContext(volume, volume_id, [ChatTurn("user", question)])
    return list(engine.chat(ctx, cancel or threading.Event()))


def _text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenOut))


def _of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def test_registered_and_describes_itself():
    assert "builtin" in engine_names()
    engine = create_engine("builtin", EngineOptions())
    info = engine.models()[0]
    assert info.capabilities.boxes and info.capabilities.masks
    assert "zh" in info.capabilities.languages
    assert "not a language model" in info.description.lower()


def test_bad_option_is_a_clear_engine_error():
    with pytest.raises(EngineError, match="brain_method"):
        BuiltinEngine(EngineOptions(extra={"brain_method": "magic"}))


def test_where_gives_one_box_on_the_correct_side(engine, ct):
    events = _ask(engine, ct, "where is the left lung?", "ct")
    text = _text(events)
    assert text.count(NOT_AN_LLM) == 1 and text.startswith(NOT_AN_LLM)
    boxes = _of(events, BoxOut)
    assert [b.label for b in boxes] == ["Left lung"]
    centre_ras = ct.ijk_to_ras @ np.array([*boxes[0].box.center, 1.0])
    assert centre_ras[0] == pytest.approx(samples.LUNG_CENTRES[1][0], abs=3.0)
    assert "patient's left side" in text
    mask = _of(_ask(engine, ct, "show the left lung", "ct"), MaskOut)[0].mask
    k, j, i = np.nonzero(mask)
    assert boxes[0].box == boxes[0].box.from_voxels(i.min(), j.min(), k.min(), i.max(), j.max(), k.max())


def test_chinese_question_gives_the_same_boxes(engine, ct):
    english = _of(_ask(engine, ct, "where are the lungs?", "ct"), BoxOut)
    chinese = _of(_ask(engine, ct, "肺在哪里？", "ct"), BoxOut)
    assert [(b.label, b.box) for b in english] == [(b.label, b.box) for b in chinese]
    assert sorted(b.label for b in english) == ["Left lung", "Right lung"]


def test_show_gives_masks_shaped_like_the_volume_with_stats(engine, ct):
    events = _ask(engine, ct, "show me the bones", "ct")
    (mask,) = _of(events, MaskOut)
    assert mask.label == "Bone"
    assert mask.mask.shape == ct.voxels.shape and mask.mask.dtype == bool
    assert mask.color is not None and all(0 <= c <= 1 for c in mask.color)
    assert mask.stats["mean"] == pytest.approx(samples.HU["bone"], abs=3)
    assert {"volume_ml", "std", "min", "max", "extent_si_mm"} <= set(mask.stats)
    assert "mL" in _text(events)


def test_how_big_reports_volume_extent_and_hu(engine, ct):
    events = _ask(engine, ct, "how big is the right lung?", "ct")
    (mask,) = _of(events, MaskOut)
    analytic_ml = 4 / 3 * np.pi * np.prod(samples.LUNG_SEMI_AXES) / 1000
    assert mask.stats["volume_ml"] == pytest.approx(analytic_ml, rel=0.02)
    assert mask.stats["extent_si_mm"] == pytest.approx(2 * samples.LUNG_SEMI_AXES[2], abs=6)
    text = _text(events)
    said_ml = float(re.search(r"measures ([0-9.]+) mL", text).group(1))
    assert said_ml == pytest.approx(mask.stats["volume_ml"], abs=0.06)
    assert "HU inside: mean -850" in text


def test_report_on_ct(engine, ct):
    events = _ask(engine, ct, "生成报告", "ct")
    (report,) = _of(events, ReportOut)
    md = report.markdown
    assert "**Modality guess:** CT" in md
    assert "128 x 88 x 100 voxels" in md
    assert "LPS" in md  # the flipped grid: i to the left, j to posterior
    for label in ("Right lung", "Left lung", "Airway", "Bone", "Body"):
        assert f"| {label} |" in md
    assert _text(events).count(NOT_AN_LLM) == 1


def test_unknown_structure_says_so_and_lists_capabilities(engine, ct):
    events = _ask(engine, ct, "where is the liver?", "ct")
    text = _text(events)
    assert "cannot find 'liver'" in text
    assert "lungs" in text and "bones" in text and "brain" in text
    assert not _of(events, BoxOut) and not _of(events, MaskOut)


def test_mr_volume_takes_the_mr_path(engine, mr):
    events = _ask(engine, mr, "report", "mr")
    (report,) = _of(events, ReportOut)
    assert "**Modality guess:** MR" in report.markdown
    assert "| Brain |" in report.markdown and "classical" in report.markdown
    brain = _of(_ask(engine, mr, "how big is the brain?", "mr"), MaskOut)[0]
    sphere_ml = 4 / 3 * np.pi * samples.HEAD_RADII["brain"] ** 3 / 1000
    assert brain.stats["volume_ml"] == pytest.approx(sphere_ml, rel=0.03)
    lungs = _ask(engine, mr, "show me the lungs", "mr")
    assert "needs CT Hounsfield units" in _text(lungs)
    assert not _of(lungs, MaskOut)


def test_brain_question_on_ct_is_refused_politely(engine, ct):
    events = _ask(engine, ct, "segment the brain", "ct")
    assert "works on brain MRI" in _text(events)
    assert not _of(events, MaskOut)


def test_cancel_stops_the_stream_early(engine, ct):
    cancel = threading.Event()
    ctx = ChatContext(ct, "ct-cancel", [ChatTurn("user", "show me the lungs and the bones")])
    events = []
    for event in engine.chat(ctx, cancel):
        events.append(event)
        cancel.set()
    assert len(events) == 1 and isinstance(events[0], TokenOut)
    full = _ask(engine, ct, "show me the lungs and the bones", "ct-cancel")
    assert len(_of(full, MaskOut)) == 3


def test_cancel_set_before_start_yields_nothing(engine, ct):
    cancel = threading.Event()
    cancel.set()
    assert _ask(engine, ct, "report", "ct", cancel) == []


def test_masks_are_cached_per_volume_and_old_volumes_dropped(ct, mr):
    engine = BuiltinEngine(EngineOptions(extra={"brain_method": "classical"}))
    first = _of(_ask(engine, ct, "show the airway", "a"), MaskOut)[0].mask
    again = _of(_ask(engine, ct, "气道", "a"), MaskOut)[0].mask
    assert again is first
    for other in ("b", "c"):
        _ask(engine, mr, "help", other)
    fresh = _of(_ask(engine, ct, "show the airway", "a"), MaskOut)[0].mask
    assert fresh is not first and np.array_equal(fresh, first)


def test_help_and_empty_questions_list_capabilities(engine, ct):
    for question in ("help", "你能做什么", "   "):
        text = _text(_ask(engine, ct, question, "ct"))
        assert "how big is" in text


def test_empty_and_odd_volumes_get_sentences_not_crashes(engine):
    from medmllm.geometry.volume import Volume

    air = Volume(np.full((20, 20, 20), -1000, np.int16), np.eye(4))
    assert "body outline is not in this scan" in _text(_ask(engine, air, "show me the body", "air"))
    (report,) = _of(_ask(engine, air, "report", "air"), ReportOut)
    assert "No structure found" in report.markdown
    flat = Volume(np.zeros((20, 20, 20), np.float32), np.eye(4))
    assert "one constant intensity" in _text(_ask(engine, flat, "show me the brain", "flat"))


def test_implausibly_small_brain_is_flagged(engine):
    from medmllm.geometry.volume import Volume

    shape = (40, 40, 40)
    blob = np.zeros(shape, np.float32)
    blob[15:25, 15:25, 15:25] = 100  # a 1 mL bright cube
    text = _text(_ask(engine, Volume(blob, np.eye(4)), "how big is the brain", "blob"))
    assert "far smaller than an adult brain" in text


def _ras(volume):
    k, j, i = np.indices(volume.shape)
    m = volume.ijk_to_ras
    return [m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)]


def test_touching_lungs_are_split_into_right_and_left(engine, ct):
    from medmllm.geometry.volume import Volume

    x, y, z = _ras(ct)
    voxels = ct.voxels.copy()
    bridge = (np.abs(x) < 40) & (np.abs(y) < 8) & (np.abs(z - 20) < 8)  # joins the two lungs
    voxels[bridge] = samples.HU["lung"]
    joined = Volume(voxels, ct.ijk_to_ras)
    events = _ask(engine, joined, "show me the left lung", "joined")
    (mask,) = _of(events, MaskOut)
    assert mask.label == "Left lung"
    analytic_ml = 4 / 3 * np.pi * np.prod(samples.LUNG_SEMI_AXES) / 1000
    bridge_ml = bridge.sum() * np.prod(joined.spacing) / 1000
    assert mask.stats["volume_ml"] == pytest.approx(analytic_ml + bridge_ml / 2, rel=0.03)
    assert np.all(x[mask.mask] < 1.0)  # nothing of it on the patient's right


def test_a_missing_side_or_structure_is_said_to_be_absent(engine, ct):
    from medmllm.geometry.volume import Volume

    x, _, _ = _ras(ct)
    voxels = ct.voxels.copy()
    voxels[(x > 0) & (voxels < -400) & (voxels > -900)] = samples.HU["body"]  # right lung gone
    one_lung = Volume(voxels, ct.ijk_to_ras)
    events = _ask(engine, one_lung, "how big is the right lung?", "one-lung")
    assert not _of(events, MaskOut)
    assert "The right lung is not in this scan; I found only the left lung." in _text(events)
    no_air = Volume(np.where(ct.voxels < -400, 40, ct.voxels).astype(np.int16), ct.ijk_to_ras)
    body = Volume(np.pad(no_air.voxels, 2, constant_values=-1000), ct.ijk_to_ras)
    events = _ask(engine, body, "show me the lungs", "no-air")
    assert not _of(events, MaskOut)
    assert "The lungs are not in this scan" in _text(events)


def contract_case(request):
    """For the engine contract suite: the chest CT phantom, where the lungs are found and boxed."""
    ct = samples.chest_ct_phantom(CT_SHAPE, _centred((2.5, 2.5, 3.0), CT_SHAPE, flip=(-1, -1, 1)))
    engine = BuiltinEngine(EngineOptions(extra={"brain_method": "classical"}))
    yield EngineCase(engine, ct, box_question="where is the left lung?", long_question="report")
    engine.close()

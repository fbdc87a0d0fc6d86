"""Engine `openai` against the fake OpenAI-compatible server: what it sends, and where its boxes land.

The phantom tests prove the whole chain slice -> PNG -> model box -> IJK -> RAS: the fake model
answers with the box of the bright lesion in the image it actually received, in each family's own
grammar, and the ROI centre must land on the lesion in RAS within half a voxel, on an oblique,
flipped, anisotropic volume with the lesion off-centre.
"""

from __future__ import annotations

import base64
import threading
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from engine_contract import EngineCase
from fake_openai_server import INTERNVL_SPECIAL_TOKENS, FakeOpenAIServer, bright_box, grounded_answer
from medmllm.engines.base import (
    BoxOut,
    ChatContext,
    ChatTurn,
    EngineOptions,
    MaskOut,
    TokenOut,
    ViewState,
    WarningOut,
)
from medmllm.engines.openai import OpenAIEngine
from medmllm.engines.registry import create_engine, engine_names
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.volume import Volume
from medmllm.grounding.images import plain_image_size
from medmllm.grounding.internvl import UNTAGGED_NOTE
from medmllm.grounding.qwen25vl import qwen_image_size
from medmllm.grounding.registry import get_dialect, slice_dialect_names
from PIL import Image

SHAPE = (30, 50, 60)  # (k, j, i)
LESION = (slice(18, 23), slice(10, 17), slice(38, 47))  # voxels k 18..22, j 10..16, i 38..46
LESION_CENTRE = np.array([42.0, 13.0, 20.0])  # (i, j, k)
VIEW_INDEX = {"axial": 20, "coronal": 13, "sagittal": 42}
API_KEY = "sk-test-123"


def _oblique_flipped() -> np.ndarray:
    """15 degrees about a tilted axis, i and k flipped, spacing 0.9 x 1.3 x 2.0 mm, far from the origin."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    angle = np.radians(15.0)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([-0.9, 1.3, -2.0])
    matrix[:3, 3] = [112.0, -48.5, 31.0]
    return matrix


def phantom() -> Volume:
    """CT-like: air, a body block at 20 HU, a 200 HU lesion off-centre inside it."""
    voxels = np.full(SHAPE, -1000, dtype=np.int16)
    voxels[2:28, 3:47, 5:56] = 20
    voxels[LESION] = 200
    return Volume.from_array(voxels, _oblique_flipped())


def lesion_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[LESION] = True
    return mask


def context(question: str, view: ViewState, **kwargs: Any) -> ChatContext:
    messages = [*kwargs.pop("history", []), ChatTurn("user", question)]
    return ChatContext(phantom(), "phantom", messages, view, **kwargs)


def run(engine: OpenAIEngine, ctx: ChatContext) -> List[Any]:
    return list(engine.chat(ctx, threading.Event()))


def engine_for(server: FakeOpenAIServer, dialect: str, **extra: Any) -> OpenAIEngine:
    options = EngineOptions(
        model=server.model, base_url=server.base_url, api_key=API_KEY, dialect=dialect, extra=extra
    )
    return create_engine("openai", options)


def lesion_answer(dialect: str) -> Any:
    return lambda body, images: grounded_answer(dialect, images[0], "lesion")


def of(events: List[Any], kind: type) -> List[Any]:
    return [e for e in events if isinstance(e, kind)]


def ras_offset_in_voxels(volume: Volume, box: IJKBox) -> np.ndarray:
    """ROI centre minus lesion centre, both in RAS, expressed along the volume axes in voxels."""
    roi_centre = np.asarray(box.to_roi(volume.ijk_to_ras).center)
    lesion_ras = (volume.ijk_to_ras @ np.append(LESION_CENTRE, 1.0))[:3]
    return np.linalg.solve(volume.ijk_to_ras[:3, :3], roi_centre - lesion_ras)


# the 60 x 50 slice enlarged to at least 512*28*28 pixels (the cookbooks' min_pixels), sides multiples of 28
QWEN_SIZE = (700, 588)


def test_engine_is_registered() -> None:
    assert "openai" in engine_names()


GROUNDING_2D = [n for n in slice_dialect_names() if "ground" in get_dialect(n).tasks]


def sent_size(dialect: str, width: int, height: int) -> Any:
    """The picture size the dialect's policy asks for, for a slice of width x height."""
    policy = get_dialect(dialect).image
    side = max(width, height)
    return policy.size(side, side) if policy.pad_square else policy.size(width, height)


@pytest.mark.parametrize("dialect", GROUNDING_2D)
def test_phantom_box_lands_on_the_lesion_in_ras(dialect: str) -> None:
    check_lesion_box(dialect)


def check_lesion_box(dialect: str) -> None:
    """Dialect contract (also run by test_contract_dialects.py): the dialect's example answer, sent by
    the fake server about the picture it received, becomes a box on the lesion in RAS."""
    question = "Where is the lesion?"
    special = INTERNVL_SPECIAL_TOKENS if get_dialect(dialect).special_markup else ()  # the served tokenizer's
    with FakeOpenAIServer(lesion_answer(dialect), "med-vlm", API_KEY, special_tokens=special) as server:
        engine = engine_for(server, dialect)
        events = run(engine, context(question, ViewState("axial", VIEW_INDEX["axial"])))
    request = server.requests[0]
    # what the engine sent: model, key, stream, one PNG of the family's size, the dialect's own prompt
    assert request.body["model"] == "med-vlm" and request.body["stream"] is True
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert len(request.images) == 1 and request.images[0].format == "PNG"
    assert request.images[0].size == sent_size(dialect, SHAPE[2], SHAPE[1])
    expected_prompt = get_dialect(dialect).build_prompt("ground", "lesion", image_size=request.images[0].size)
    assert request.prompt == expected_prompt
    # what came back: the text streamed, one box one slice thick on the lesion
    text = "".join(e.text for e in of(events, TokenOut))
    assert text == grounded_answer(dialect, request.images[0], "lesion")
    boxes = of(events, BoxOut)
    assert len(boxes) == 1 and boxes[0].label == "lesion"
    box = boxes[0].box
    assert boxes[0].source["dialect"] == dialect and boxes[0].source["slice_index"] == 20
    assert box.hi[2] - box.lo[2] == pytest.approx(1.0)
    assert np.all(np.abs(ras_offset_in_voxels(phantom(), box)) <= 0.5)
    (i0, j0, _), (i1, j1, _) = box.voxel_range()
    assert abs(i0 - 38) <= 1 and abs(i1 - 46) <= 1 and abs(j0 - 10) <= 1 and abs(j1 - 16) <= 1
    assert not of(events, WarningOut)


@pytest.mark.parametrize("orientation", ["coronal", "sagittal"])
def test_other_orientations_land_on_the_lesion(orientation: str) -> None:
    with FakeOpenAIServer(lesion_answer("internvl")) as server:
        events = run(
            engine_for(server, "internvl"),
            context("Please locate the lesion", ViewState(orientation, VIEW_INDEX[orientation])),
        )
    (box,) = of(events, BoxOut)
    axis = {"coronal": 1, "sagittal": 0}[orientation]
    assert box.source["slice_axis"] == axis
    assert np.all(np.abs(ras_offset_in_voxels(phantom(), box.box)) <= 0.5)


def test_window_is_applied_to_the_slice() -> None:
    with FakeOpenAIServer(lambda body, images: "ok") as server:
        run(engine_for(server, "plain"), context("what is this?", ViewState("axial", 20, (100.0, 20.0))))
    pixels = np.asarray(server.requests[0].images[0])
    # window 90..110 HU: only the 200 HU lesion is bright, the 20 HU body is as black as air
    assert pixels.max() == 255 and (pixels > 0).mean() < 0.1


def test_medgemma_gets_three_ct_windows_as_rgb() -> None:
    with FakeOpenAIServer(lesion_answer("medgemma")) as server:
        run(engine_for(server, "medgemma"), context("Where is the lesion?", ViewState("axial", 20)))
        run(
            engine_for(server, "medgemma"), context("Where is the lesion?", ViewState("axial", 20, (40, 400)))
        )
    rgb, gray = (r.images[0] for r in server.requests)
    assert rgb.mode == "RGB" and gray.mode == "L"
    pixels = np.asarray(rgb)
    centre = pixels[448, 448]  # the middle of the square: body tissue at 20 HU
    # R: W2250/L-100, G: W350/L40, B: W80/L40 (Google-Health/medgemma#27)
    expected = [round((20 - lo) / width * 255) for lo, width in [(-1225, 2250), (-135, 350), (0, 80)]]
    assert np.all(np.abs(centre.astype(int) - expected) <= 2), (centre, expected)


def test_segment_question_yields_a_mask_of_the_lesion() -> None:
    with FakeOpenAIServer(lesion_answer("qwen25vl")) as server:
        events = run(engine_for(server, "qwen25vl"), context("Segment the lesion", ViewState("axial", 20)))
    (mask_event,) = of(events, MaskOut)
    truth = lesion_mask()
    dice = 2 * (mask_event.mask & truth).sum() / (mask_event.mask.sum() + truth.sum())
    assert mask_event.label == "lesion" and mask_event.mask.shape == SHAPE and dice >= 0.9
    assert server.requests[0].prompt == get_dialect("qwen25vl").build_prompt(
        "ground", "lesion", image_size=QWEN_SIZE
    )


def test_no_mask_without_a_segmenter() -> None:
    with FakeOpenAIServer(lesion_answer("internvl")) as server:
        events = run(
            engine_for(server, "internvl", segmenter="none"), context("segment the lesion", ViewState())
        )
    assert of(events, BoxOut) and not of(events, MaskOut)


def test_region_question_writes_the_roi_in_the_dialect_grammar() -> None:
    seen: Dict[str, Any] = {}

    def answer(body: Dict[str, Any], images: List[Image.Image]) -> str:
        seen["lesion"] = bright_box(images[0])
        return "a hyperdense lesion"

    roi = IJKBox.from_voxels(38, 10, 15, 46, 16, 25)  # the lesion, several slices thick
    with FakeOpenAIServer(answer) as server:
        events = run(
            engine_for(server, "internvl"), context("What is this?", ViewState("axial", 20), roi=roi)
        )
    prompt = server.requests[0].prompt
    expected = [round(v * 999) for v in seen["lesion"]]
    written = [int(v) for v in prompt.split("<box>[[")[1].split("]]")[0].split(",")]
    assert np.all(np.abs(np.array(written) - expected) <= 3), (written, expected)
    assert "".join(e.text for e in of(events, TokenOut)) == "a hyperdense lesion"
    assert not of(events, WarningOut)


def test_roi_that_misses_the_slice_is_left_out_with_a_warning() -> None:
    roi = IJKBox.from_voxels(38, 10, 2, 46, 16, 5)
    with FakeOpenAIServer(lambda body, images: "cannot tell") as server:
        events = run(
            engine_for(server, "internvl"), context("What is this?", ViewState("axial", 20), roi=roi)
        )
    assert "<box>" not in server.requests[0].prompt
    (warning,) = of(events, WarningOut)
    assert "does not cross the axial slice 20" in warning.message


def test_prior_turns_are_passed_before_the_new_question() -> None:
    history = [ChatTurn("user", "Is there a lesion?"), ChatTurn("assistant", "Yes, one.")]
    with FakeOpenAIServer(lambda body, images: "In the right lobe.") as server:
        run(engine_for(server, "plain"), context("Which side?", ViewState(), history=history))
    messages = server.requests[0].body["messages"]
    assert [(m["role"], m["content"]) for m in messages[:2]] == [
        ("user", "Is there a lesion?"),
        ("assistant", "Yes, one."),
    ]
    assert messages[2]["role"] == "user" and server.requests[0].prompt.endswith("Which side?")


def test_medrega_gets_its_training_system_message() -> None:
    with FakeOpenAIServer(lambda body, images: "ok", model="Luxuriant16/medrega") as server:
        engine = create_engine("openai", EngineOptions(model=server.model, base_url=server.base_url))
        run(engine, context("what is this?", ViewState()))
    assert engine.dialect_name == "internvl"
    assert server.requests[0].body["messages"][0] == {"role": "system", "content": "Answer the questions."}


def test_report_question_sends_evenly_spaced_slices() -> None:
    with FakeOpenAIServer(lambda body, images: "No acute findings.") as server:
        run(engine_for(server, "plain", max_images=3), context("Write a report", ViewState("axial", 20)))
    request = server.requests[0]
    assert len(request.images) == 3
    labels = [p["text"] for p in request.body["messages"][-1]["content"] if p["type"] == "text"][:3]
    assert labels == ["axial slice 5:", "axial slice 15:", "axial slice 25:"]


def test_box_in_a_multi_slice_answer_is_not_placed() -> None:
    answer = "<ref>lesion</ref><box>[[100, 100, 200, 200]]</box>"
    with FakeOpenAIServer(lambda body, images: answer) as server:
        events = run(
            engine_for(server, "internvl", max_images=2), context("Describe the findings", ViewState())
        )
    assert not of(events, BoxOut)
    assert any("several slices" in w.message for w in of(events, WarningOut))


def test_answer_without_box_warns_and_keeps_the_text() -> None:
    answer = "I cannot see a lesion on this slice."
    with FakeOpenAIServer(lambda body, images: answer) as server:
        events = run(engine_for(server, "internvl"), context("Where is the lesion?", ViewState()))
    assert "".join(e.text for e in of(events, TokenOut)) == answer
    assert not of(events, BoxOut)
    assert any("without a internvl box" in w.message for w in of(events, WarningOut))


def test_box_outside_the_image_is_clamped_with_a_warning() -> None:
    answer = "<ref>lesion</ref><box>[[-40, 100, 1400, 500]]</box>"
    with FakeOpenAIServer(lambda body, images: answer) as server:
        events = run(engine_for(server, "internvl"), context("Where is the lesion?", ViewState("axial", 20)))
    (box,) = of(events, BoxOut)
    assert of(events, WarningOut)
    (i0, _, _), (i1, _, _) = box.box.voxel_range()
    assert (i0, i1) == (0, 59)  # the whole width of the slice, no further


def test_medgemma_box_in_the_padding_is_dropped_with_a_warning() -> None:
    # the 60 x 50 slice is centred on a 60 x 60 square: rows 0..5 of the square are padding
    answer = '```json\n[{"box_2d": [0, 100, 60, 900], "label": "lesion"}]\n```'
    with FakeOpenAIServer(lambda body, images: answer) as server:
        events = run(engine_for(server, "medgemma"), context("Where is the lesion?", ViewState("axial", 20)))
    assert not of(events, BoxOut)
    assert any("outside the slice" in w.message for w in of(events, WarningOut))


def test_cancel_stops_the_stream_early() -> None:
    answer = "word " * 200
    cancel = threading.Event()
    with FakeOpenAIServer(lambda body, images: answer, chunk_size=5, chunk_delay=0.02) as server:
        engine = engine_for(server, "plain")
        tokens = []
        for event in engine.chat(context("what is this?", ViewState()), cancel):
            if isinstance(event, TokenOut):
                tokens.append(event.text)
                cancel.set()
    assert 1 <= len(tokens) < 200


def test_cancel_interrupts_a_blocked_read() -> None:
    cancel = threading.Event()
    done = threading.Event()
    result: Dict[str, Optional[List[Any]]] = {"events": None}

    def consume(engine: OpenAIEngine) -> None:
        result["events"] = list(engine.chat(context("what is this?", ViewState()), cancel))
        done.set()

    with FakeOpenAIServer(lambda body, images: "late", chunk_delay=30.0) as server:
        worker = threading.Thread(
            target=consume, args=(engine_for(server, "plain", timeout=60),), daemon=True
        )
        worker.start()
        while not server.requests and worker.is_alive():
            done.wait(0.01)
        cancel.set()
        assert done.wait(10), "the engine kept waiting for the server after cancel"
    assert result["events"] == []


def test_model_is_taken_from_the_server_when_not_given() -> None:
    with FakeOpenAIServer(lambda body, images: "ok", model="google/medgemma-4b-it") as server:
        engine = create_engine("openai", EngineOptions(base_url=server.base_url.replace("/v1", "")))
        events = run(engine, context("what is this?", ViewState()))
    assert server.requests[0].body["model"] == "google/medgemma-4b-it"
    assert "".join(e.text for e in of(events, TokenOut)) == "ok"


def test_models_describes_the_engine() -> None:
    engine = create_engine(
        "openai", EngineOptions(model="Lingshu-7B", base_url="http://localhost:8000/v1", dialect=None)
    )
    (info,) = engine.models()
    assert engine.dialect_name == "qwen25vl"
    assert info.capabilities.input == "slice2d" and info.capabilities.boxes and info.capabilities.masks


def test_png_is_a_valid_grayscale_image_of_the_slice() -> None:
    with FakeOpenAIServer(lambda body, images: "ok") as server:
        run(engine_for(server, "plain"), context("what is this?", ViewState("axial", 20)))
    url = server.requests[0].body["messages"][-1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    image = server.requests[0].images[0]
    assert image.size == (60, 50) and image.mode == "L"


# Qwen2.5-VL's own resize rule, as transformers implements it (the PIL processor needs no torchvision).
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # noqa: E402

QWEN_CONFIGS = {
    "processor default": (56 * 56, 28 * 28 * 1280),
    "checkpoint preprocessor_config.json": (3136, 12845056),
    "README": (256 * 28 * 28, 1280 * 28 * 28),
    "OCR / document-parsing cookbooks (API)": (512 * 28 * 28, 2048 * 28 * 28),
}
SLICES = [(60, 50), (392, 448), (512, 512), (512, 300), (2000, 1500), (30, 400), (1000, 1000), (1002, 999)]
EDGE_ON = [(512, 1), (1, 300), (512, 3), (4000, 20)]


@pytest.mark.parametrize("config", QWEN_CONFIGS)
def test_qwen_sizes_are_kept_by_every_common_processor_configuration(config: str) -> None:
    min_pixels, max_pixels = QWEN_CONFIGS[config]
    for width, height in SLICES + EDGE_ON:
        w, h = qwen_image_size(width, height)
        assert smart_resize(h, w, 28, min_pixels, max_pixels) == (h, w), (width, height, w, h)
        if (width, height) in SLICES:
            assert abs(w / h - width / height) / (width / height) < 0.2


def test_plain_images_keep_a_minimum_side_and_aspect_that_qwen_servers_accept() -> None:
    assert plain_image_size(60, 50) == (60, 50) and plain_image_size(2048, 1024) == (1024, 512)
    for width, height in EDGE_ON:
        w, h = plain_image_size(width, height)
        assert min(w, h) >= 28 and max(w, h) / min(w, h) <= 50
        smart_resize(h, w)  # raises ValueError on an aspect ratio >= 200
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 512)  # what an unguarded edge-on slice meets


def _lesion_box_is_right(boxes: List[Any]) -> None:
    assert len(boxes) == 1 and boxes[0].label == "lesion"
    assert np.all(np.abs(ras_offset_in_voxels(phantom(), boxes[0].box)) <= 0.5)


def test_internvl_asks_to_keep_its_special_tokens() -> None:
    with FakeOpenAIServer(lesion_answer("internvl")) as server:
        events = run(engine_for(server, "internvl"), context("Where is the lesion?", ViewState("axial", 20)))
    assert server.requests[0].body["skip_special_tokens"] is False
    assert "".join(e.text for e in of(events, TokenOut)).startswith("<ref>lesion</ref><box>[[")
    _lesion_box_is_right(of(events, BoxOut))
    assert not of(events, WarningOut)


def test_a_server_that_refuses_the_field_is_asked_again_and_the_bare_form_lands_on_the_lesion() -> None:
    with FakeOpenAIServer(lesion_answer("internvl"), strict_fields=True) as server:
        engine = engine_for(server, "internvl")
        events = run(engine, context("Where is the lesion?", ViewState("axial", 20)))
        run(engine, context("Where is the lesion?", ViewState("axial", 20)))
    first, retry, second = server.requests
    assert first.body["skip_special_tokens"] is False
    assert "skip_special_tokens" not in retry.body and "skip_special_tokens" not in second.body
    text = "".join(e.text for e in of(events, TokenOut))
    assert text.startswith("lesion[[") and "<ref>" not in text
    _lesion_box_is_right(of(events, BoxOut))
    assert [w.message for w in of(events, WarningOut)] == [UNTAGGED_NOTE]


def test_plain_dialects_do_not_send_the_field() -> None:
    with FakeOpenAIServer(lesion_answer("qwen25vl"), strict_fields=True) as server:
        events = run(engine_for(server, "qwen25vl"), context("Where is the lesion?", ViewState("axial", 20)))
    assert len(server.requests) == 1 and "skip_special_tokens" not in server.requests[0].body
    _lesion_box_is_right(of(events, BoxOut))


def test_without_model_or_dialect_the_served_name_chooses_dialect_and_system_prompt() -> None:
    with FakeOpenAIServer(lesion_answer("internvl"), model="Luxuriant16/medrega") as server:
        engine = create_engine("openai", EngineOptions(base_url=server.base_url))
        assert engine.dialect_name == "plain"  # nothing known before the server answers
        events = run(engine, context("Where is the lesion?", ViewState("axial", 20)))
    assert engine.dialect_name == "internvl"
    assert server.requests[0].body["messages"][0] == {"role": "system", "content": "Answer the questions."}
    assert server.requests[0].images[0].size == (448, 448)
    _lesion_box_is_right(of(events, BoxOut))


def test_without_model_a_boxless_answer_still_warns() -> None:
    with FakeOpenAIServer(lambda body, images: "I cannot see it.", model="Luxuriant16/medrega") as server:
        events = run(
            create_engine("openai", EngineOptions(base_url=server.base_url)),
            context("Where is the lesion?", ViewState()),
        )
    assert [w.message for w in of(events, WarningOut)] == [
        "the model answered without a internvl box; no ROI was made"
    ]


def contract_case(request):
    """For the engine contract suite: the fake server answering like MedRegA, slowly enough that
    an answer streams for seconds (cancel is checked on it)."""

    def answer(body: Dict[str, Any], images: List[Image.Image]) -> str:
        if "lesion" in str(body["messages"][-1]["content"]):
            return grounded_answer("internvl", images[0], "lesion")
        return "The image shows a block of soft tissue with a brighter lesion. " * 20

    with FakeOpenAIServer(answer, model="medrega", chunk_size=4, chunk_delay=0.01) as server:
        engine = create_engine("openai", EngineOptions(model="medrega", base_url=server.base_url))
        yield EngineCase(engine, phantom(), box_question="Where is the lesion?", view=ViewState("axial", 20))
        engine.close()

"""The `minigptmed` engine on a tiny checkpoint: prompt layout, KV-cached decoding, boxes in voxels."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # noqa: F401
from conftest import load_script
from engine_contract import EngineCase
from medmllm.engines.base import (
    BoxOut,
    ChatContext,
    ChatTurn,
    EngineError,
    EngineOptions,
    MaskOut,
    TokenOut,
    ViewState,
    WarningOut,
)
from medmllm.engines.registry import create_engine, engine_names
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.slices import export_slice
from medmllm.geometry.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "Testing" / ".tiny" / "minigptmed-engine"
PLANTED = "<p>tumor</p> {<20><30><40><55>}"


@pytest.fixture(scope="module")
def engine():
    maker = load_script("make_tiny_minigptmed")
    shutil.rmtree(TINY, ignore_errors=True)
    maker.make_tiny(str(TINY), seed=5)
    eng = create_engine("minigptmed", EngineOptions(model=str(TINY)))  # the folder holds all inputs
    yield eng
    eng.close()


def block_volume() -> Volume:
    """50 (i) x 40 (j) x 6 (k), flipped in-plane axes and anisotropic spacing; a bright block at
    i 10..19, j 12..21, k 2..3 on a dark background."""
    voxels = np.zeros((6, 40, 50), np.float32)
    voxels[2:4, 12:22, 10:20] = 1000.0
    matrix = np.diag([-0.8, -1.2, 2.5, 1.0])
    matrix[:3, 3] = (12.0, -3.0, 40.0)
    return Volume.from_array(voxels, matrix)


def _ctx(volume, question, view=None, roi=None, max_new_tokens=48, volume_id="vol"):
    return ChatContext(
        volume=volume,
        volume_id=volume_id,
        messages=[ChatTurn("user", question)],
        view=view or ViewState("axial", 2),
        roi=roi,
        max_new_tokens=max_new_tokens,
    )


def _run(engine, ctx, cancel=None):
    return list(engine.chat(ctx, cancel or threading.Event()))


def test_registered():
    assert "minigptmed" in engine_names()


def test_prompt_layout_puts_the_image_between_img_tags(engine):
    tok = engine.tokenizer
    head, tail = engine.prompt_ids("[detection] tumor")
    # get_context_emb: first piece tokenised with special tokens -> BOS, then the literal <s>.
    assert head[:2] == [1, 1]
    assert tok.decode(head[2:]).strip() == "[INST] <Img>"
    assert tok.decode(tail).strip() == "</Img> [detection] tumor [/INST]"
    state = engine._slice_state(_ctx(block_volume(), "x"))
    assert state.prefix_len == len(head) + 256
    assert state.prefix.get_seq_length() == len(head) + 256


def _reference_greedy(engine, volume, text, steps):
    """No cache: the whole sequence (head, 256 image embeddings, tail, answer so far) every step."""
    from medmllm.engines.minigptmed.model import image_tensor

    model = engine.model
    head, tail = engine.prompt_ids(text)
    view = export_slice(volume, "axial", 2)
    with torch.no_grad():
        image = model.encode_img(image_tensor(view.pixels, 448))
        embeds = torch.cat(
            [model.embed(torch.tensor([head])), image, model.embed(torch.tensor([tail]))], dim=1
        )
        ids = []
        for _ in range(steps):
            token = int(torch.argmax(model.logits(model.run(embeds, None)[:, -1])[0]))
            if token in engine.loaded.eos_ids:
                break
            ids.append(token)
            embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], dim=1)
    return ids


def test_kv_cached_greedy_equals_full_recompute(engine, monkeypatch):
    stepped = []
    original = engine.decoder.step

    def recording(cache, position, token_id):
        stepped.append(token_id)
        return original(cache, position, token_id)

    monkeypatch.setattr(engine.decoder, "step", recording)
    volume = block_volume()
    events = _run(engine, _ctx(volume, "[vqa] which organ is this?", max_new_tokens=14))
    expected = _reference_greedy(engine, volume, "[vqa] which organ is this?", 14)
    assert len(expected) >= 8 and len(set(expected)) >= 4  # a live model, not one repeated token
    assert stepped == expected
    text = "".join(e.text for e in events if isinstance(e, TokenOut))
    assert text == engine.tokenizer.decode(expected)


def _plant(engine, monkeypatch, answer):
    """Teacher-force: the LM head emits `answer` token by token, then EOS, whatever it sees."""
    planned = [*engine.tokenizer(answer, add_special_tokens=False)["input_ids"], 2]
    calls = {"n": 0}
    vocab = engine.model.lm.config.vocab_size

    def forced(hidden):
        logits = torch.full((hidden.shape[0], vocab), -1e9)
        logits[:, planned[min(calls["n"], len(planned) - 1)]] = 0.0
        calls["n"] += 1
        return logits

    monkeypatch.setattr(engine.model, "logits", forced)


def test_planted_answer_becomes_a_box_on_the_right_voxels(engine, monkeypatch):
    volume = block_volume()
    view = export_slice(volume, "axial", 2)
    rows, cols = np.nonzero(view.pixels > 128)
    # The values a perfect model would write for the block, as ints 0-100 of the slice.
    values = [
        100 * cols.min() / view.width,
        100 * rows.min() / view.height,
        100 * (cols.max() + 1) / view.width,
        100 * (rows.max() + 1) / view.height,
    ]
    assert values == [20, 30, 40, 55]  # the volume is laid out so they are exact integers
    _plant(engine, monkeypatch, PLANTED)
    events = _run(engine, _ctx(volume, "Where is the tumor?"))
    text = "".join(e.text for e in events if isinstance(e, TokenOut))
    assert text == PLANTED
    boxes = [e for e in events if isinstance(e, BoxOut)]
    assert len(boxes) == 1 and boxes[0].label == "tumor"
    (i0, j0, k0), (i1, j1, k1) = boxes[0].box.voxel_range()
    assert (i0, i1, j0, j1, k0, k1) == (10, 19, 12, 21, 2, 2)
    assert boxes[0].source["values"] == [20, 30, 40, 55] and boxes[0].source["slice_index"] == 2
    assert not [e for e in events if isinstance(e, WarningOut)]


def test_box_outside_the_slice_is_clamped_or_dropped(engine, monkeypatch):
    _plant(engine, monkeypatch, "<p>a</p> {<90><10><130><20>} <p>b</p> {<120><10><130><20>}")
    events = _run(engine, _ctx(block_volume(), "[detection] a"))
    boxes = [e for e in events if isinstance(e, BoxOut)]
    warnings = [e.message for e in events if isinstance(e, WarningOut)]
    assert [b.label for b in boxes] == ["a"]
    assert any("clamped" in w for w in warnings) and any("dropped" in w for w in warnings)


def test_question_forms(engine):
    volume = block_volume()
    view = export_slice(volume, "axial", 2)
    roi = IJKBox.from_voxels(10, 12, 2, 19, 21, 3)
    assert engine.question_text(_ctx(volume, "", roi=roi), view) == (
        "[identify] what is this {<20><30><40><55>}",
        "region",
        [],
    )
    assert engine.question_text(_ctx(volume, "Where is the tumor?"), view)[:2] == (
        "[detection] tumor",
        "ground",
    )
    assert engine.question_text(_ctx(volume, "Segment the tumor"), view)[:2] == (
        "[detection] tumor",
        "segment",
    )
    assert engine.question_text(_ctx(volume, "[refer] the nodule"), view)[:2] == (
        "[refer] the nodule",
        "ground",
    )
    assert engine.question_text(_ctx(volume, "[vqa] which organ?"), view)[:2] == (
        "[vqa] which organ?",
        "chat",
    )
    assert engine.question_text(_ctx(volume, "Write a report"), view)[0] == "Describe this image in detail"
    off_slice = IJKBox.from_voxels(10, 12, 5, 19, 21, 5)
    text, task, notes = engine.question_text(_ctx(volume, "what is it?", roi=off_slice), view)
    assert (text, task) == ("what is it?", "chat") and "does not cross" in notes[0].message


def test_segment_question_adds_a_mask_from_the_box(engine, monkeypatch):
    _plant(engine, monkeypatch, PLANTED)
    volume = block_volume()
    events = _run(engine, _ctx(volume, "Segment the tumor"))
    masks = [e for e in events if isinstance(e, MaskOut)]
    assert len(masks) == 1 and masks[0].label == "tumor"
    assert np.array_equal(masks[0].mask, volume.voxels > 500)
    assert engine.models()[0].capabilities.masks


def test_answer_without_a_box_warns(engine, monkeypatch):
    _plant(engine, monkeypatch, "no tumor seen")
    events = _run(engine, _ctx(block_volume(), "Where is the tumor?"))
    assert not [e for e in events if isinstance(e, BoxOut)]
    assert any("without a box" in e.message for e in events if isinstance(e, WarningOut))


def test_image_is_encoded_once_per_slice(engine, monkeypatch):
    calls = []
    original = engine.model.encode_img
    monkeypatch.setattr(engine.model, "encode_img", lambda image: calls.append(1) or original(image))
    volume = block_volume()
    for question, index in (("[vqa] one", 1), ("[vqa] two", 1), ("[vqa] three", 4)):
        _run(
            engine,
            _ctx(volume, question, view=ViewState("axial", index), max_new_tokens=2, volume_id="cache"),
        )
    assert len(calls) == 2


def test_cancel_stops_before_any_token(engine):
    cancel = threading.Event()
    cancel.set()
    assert not [e for e in _run(engine, _ctx(block_volume(), "[vqa] hi"), cancel) if isinstance(e, TokenOut)]


def test_bad_inputs(engine):
    volume = block_volume()
    with pytest.raises(EngineError, match="index 9 is out of range"):
        _run(engine, _ctx(volume, "hi", view=ViewState("axial", 9)))
    flat = Volume.from_array(np.zeros((1, 40, 50), np.float32), np.eye(4))
    with pytest.raises(EngineError, match="single 2D image"):
        _run(engine, _ctx(flat, "hi", view=ViewState("coronal", 3), volume_id="flat"))
    with pytest.raises(EngineError, match="question is empty"):
        _run(engine, _ctx(volume, "   "))
    with pytest.raises(EngineError, match="Vision-CAIR/MiniGPT-Med"):
        create_engine("minigptmed", EngineOptions())
    with pytest.raises(EngineError, match=r"unknown segmenter .nope."):
        create_engine("minigptmed", EngineOptions(extra={"segmenter": "nope"}))
    with pytest.raises(EngineError, match="temperature"):
        _run(
            engine,
            ChatContext(volume, "vol", [ChatTurn("user", "hi")], ViewState("axial", 2), temperature=-1),
        )


def contract_case(request):
    """For the engine contract suite: the tiny random MiniGPT-Med checkpoint (its words promise no box)."""
    folder = ROOT / "Testing" / ".tiny" / "minigptmed-contract"
    shutil.rmtree(folder, ignore_errors=True)
    load_script("make_tiny_minigptmed").make_tiny(str(folder), seed=5)
    engine = create_engine("minigptmed", EngineOptions(model=str(folder)))
    yield EngineCase(engine, block_volume(), view=ViewState("axial", 2))
    engine.close()

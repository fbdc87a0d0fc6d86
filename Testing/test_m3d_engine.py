"""The m3d engine on a tiny official-format checkpoint: prompt, decoding, streaming, boxes and masks."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
import torch
import transformers  # noqa: F401
from engine_contract import EngineCase
from medmllm.engines.base import (
    BoxOut,
    ChatContext,
    ChatTurn,
    EngineError,
    EngineOptions,
    MaskOut,
    TokenOut,
    WarningOut,
)
from medmllm.engines.m3d import engine as engine_module
from medmllm.engines.m3d.generation import Decoder, IncrementalDetokenizer
from medmllm.engines.registry import create_engine
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
PLANTED = (
    "<bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end> The target is liver and the segmentation mask is [SEG]."
)
AFFINE = np.array([[0.0, 0.0, -2.5, 30.0], [0.0, 1.5, 0.0, -12.0], [0.8, 0.0, 0.0, 5.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def engine(tiny_m3d):
    return create_engine("m3d", EngineOptions(model=tiny_m3d, device="cpu"))


def phantom() -> Volume:
    """40x60x50 [k, j, i], foreground block k 5..29, j 10..49, i 8..44, non-identity IJK->RAS."""
    v = np.full((40, 60, 50), -1000, np.int16)
    v[5:30, 10:50, 8:45] = 40
    v[12:20, 20:30, 15:25] = 300
    return Volume.from_array(v, AFFINE)


def ctx_for(volume: Volume, question: str, volume_id: str = "phantom", **kw: Any) -> ChatContext:
    return ChatContext(volume=volume, volume_id=volume_id, messages=[ChatTurn("user", question)], **kw)


def run(engine, ctx: ChatContext) -> List[Any]:
    return list(engine.chat(ctx, threading.Event()))


def text_of(events: List[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenOut))


def reference_greedy(engine, volume: Volume, question: str, steps: int) -> List[int]:
    """Slow path: the whole sequence recomputed without any cache at every step."""
    model, loaded = engine.model, engine.loaded
    image, _ = engine_module.M3DGrid.prepare(volume)
    ids = engine.prompt_ids(question)
    with torch.no_grad():
        features = model.image_features(model.image_tensor(image))
        embeds = torch.cat(
            [model.prefix_embeds(loaded.prefix_id, features), model.embed(torch.tensor([ids[257:]]))], 1
        )
        out: List[int] = []
        for _ in range(steps):
            token = int(model.logits(model.run(embeds, None)[:, -1])[0].argmax())
            if token in loaded.eos_ids:
                break
            out.append(token)
            embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], 1)
    return out


def test_prompt_layout_is_the_official_tokenizer_call(engine):
    # Phi-3's tokenizer adds no BOS: tokenizer("<im_patch>" * 256 + question) starts with <im_patch>,
    # positions 1..256 become the image, and the question's first token (at 256) is overwritten too
    ids = engine.prompt_ids("Where is the liver?")
    tok = engine.loaded.tokenizer
    patch = tok.convert_tokens_to_ids("<im_patch>")
    assert ids == tok("<im_patch>" * 256 + "Where is the liver?")["input_ids"]
    assert engine.loaded.prefix_id == patch and ids[:256] == [patch] * 256
    assert tok.decode(ids[256:]) == "Where is the liver?"


def test_image_features_sit_at_positions_1_to_256(engine):
    model = engine.model
    image = torch.rand(32, 256, 256)
    with torch.no_grad():
        features = model.image_features(model.image_tensor(image))
        prefix = model.prefix_embeds(engine.loaded.prefix_id, features)
        first = model.embed(torch.tensor([[engine.loaded.prefix_id]]))
    assert features.shape == (1, 256, 64)
    assert prefix.shape == (1, 257, 64)
    assert torch.equal(prefix[:, 0], first[:, 0]) and torch.equal(prefix[:, 1:], features)


def test_greedy_matches_full_recompute_and_transformers_generate(engine):
    volume, question = phantom(), "Please generate a medical report based on this image."
    events = run(engine, ctx_for(volume, question, max_new_tokens=24))
    reference = reference_greedy(engine, volume, question, 24)
    assert len(set(reference)) > 3  # a lively tiny model, so a broken cache cannot pass by repetition
    assert text_of(events) == engine.loaded.tokenizer.decode(reference)
    model = engine.model
    image, _ = engine_module.M3DGrid.prepare(volume)
    ids = engine.prompt_ids(question)
    with torch.no_grad():
        prefix = model.prefix_embeds(engine.loaded.prefix_id, model.image_features(model.image_tensor(image)))
        embeds = torch.cat([prefix, model.embed(torch.tensor([ids[257:]]))], 1)
        generated = model.lm.generate(
            inputs_embeds=embeds,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(engine.loaded.eos_ids),
            pad_token_id=engine.loaded.eos_ids[0],
        )
    assert generated[0].tolist()[: len(reference)] == reference


def test_static_cache_path_matches_dynamic(tiny_m3d, engine):
    """The unbatched path (batch_slots 0): each conversation alone on a pooled StaticCache."""
    static = create_engine(
        "m3d", EngineOptions(model=tiny_m3d, device="cpu", extra={"static_cache": True, "batch_slots": 0})
    )
    assert static.decoder.static
    for question in ("Where is the spleen in this image? Please output the box.", "Describe the findings."):
        ctx = ctx_for(phantom(), question, max_new_tokens=20)
        assert text_of(run(static, ctx)) == text_of(run(engine, ctx))
    assert len(static.decoder._pool) == 1  # the second conversation reused the first one's cache
    off = create_engine("m3d", EngineOptions(model=tiny_m3d, device="cpu", extra={"static_cache": "false"}))
    assert not off.decoder.static  # command-line strings are parsed, not truthy


def test_compiled_static_step_traces_once_without_graph_breaks(tiny_m3d, engine):
    """The CUDA path's step, traced by dynamo on CPU (eager backend): one graph, no per-token recompile."""
    from torch._dynamo.utils import counters

    static = create_engine(
        "m3d", EngineOptions(model=tiny_m3d, device="cpu", extra={"static_cache": True, "batch_slots": 0})
    )
    torch._dynamo.reset()
    counters.clear()
    compiled = {"backend": "eager", "fullgraph": True}
    static.decoder = Decoder(static.model, True, compiled, static.static_len)
    for question in ("Describe the findings.", "Where is the liver? Please output the box."):
        ctx = ctx_for(phantom(), question, max_new_tokens=10)
        assert text_of(run(static, ctx)) == text_of(run(engine, ctx))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_prefix_cache_is_computed_once_and_reused(engine, monkeypatch):
    calls = []
    original = engine.model.image_features
    monkeypatch.setattr(engine.model, "image_features", lambda x: calls.append(1) or original(x))
    volume = phantom()
    engine.prepare(volume, "reuse")
    first = text_of(run(engine, ctx_for(volume, "Describe the findings.", "reuse", max_new_tokens=8)))
    second = text_of(run(engine, ctx_for(volume, "Describe the findings.", "reuse", max_new_tokens=8)))
    assert calls == [1]
    assert first == second
    assert engine._volumes["reuse"].prefix.get_seq_length() == 257
    engine.close()
    assert not engine._volumes


class Planted:
    """Forces the LM's choices to a planted answer while every hidden state stays the real one."""

    def __init__(self, engine, answer: str) -> None:
        self.tokens = engine.loaded.tokenizer(answer, add_special_tokens=False)["input_ids"] + [
            engine.loaded.eos_ids[0]
        ]
        self.original = engine.model.logits
        self.calls = 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full_like(self.original(hidden), -1e9)
        logits[..., self.tokens[min(self.calls, len(self.tokens) - 1)]] = 0.0
        self.calls += 1
        return logits


def test_planted_box_and_mask_land_on_the_volume(engine, monkeypatch):
    planted = Planted(engine, PLANTED)
    monkeypatch.setattr(engine.model, "logits", planted)
    volume = phantom()
    question = "Can you segment the liver in this image? Please output the mask."
    events = run(engine, ctx_for(volume, question, "planted"))
    assert text_of(events) == PLANTED
    boxes = [e for e in events if isinstance(e, BoxOut)]
    masks = [e for e in events if isinstance(e, MaskOut)]
    assert len(boxes) == 1 and len(masks) == 1
    # Crop: offset (5, 10, 8), size (25, 40, 37) in [k, j, i]; box edge = offset - 0.5 + f * size,
    # the max inclusive (+ 1/32 on D, + 1/256 on H and W).
    expected_lo = (7.5 + 0.3 * 37, 9.5 + 0.2 * 40, 4.5 + 0.1 * 25)
    expected_hi = (7.5 + (0.7 + 1 / 256) * 37, 9.5 + (0.6 + 1 / 256) * 40, 4.5 + (0.5 + 1 / 32) * 25)
    assert np.allclose(boxes[0].box.lo, expected_lo) and np.allclose(boxes[0].box.hi, expected_hi)
    assert boxes[0].source["values"] == [0.1, 0.2, 0.3, 0.5, 0.6, 0.7]
    assert masks[0].label == "liver"
    assert masks[0].mask.shape == volume.shape and masks[0].mask.dtype == bool
    # Events arrive as the text completes: the box right after "<bx_end>", the mask after "[SEG]".
    kinds = [type(e).__name__ for e in events]
    box_at, mask_at = kinds.index("BoxOut"), kinds.index("MaskOut")
    assert "<bx_end>" in text_of(events[:box_at]) and "The target" not in text_of(events[:box_at])
    assert text_of(events[:mask_at]).endswith("[SEG]")


def test_mask_uses_the_hidden_state_that_predicted_seg(engine, monkeypatch):
    """LISA-style: the hidden at the token *before* [SEG], recomputed here without a cache."""
    monkeypatch.setattr(engine.model, "logits", Planted(engine, PLANTED))
    volume = phantom()
    question = "Can you segment the liver in this image? Please output the mask."
    mask = next(e for e in run(engine, ctx_for(volume, question, "lisa")) if isinstance(e, MaskOut)).mask
    model, tok = engine.model, engine.loaded.tokenizer
    answer = tok(PLANTED, add_special_tokens=False)["input_ids"]
    before_seg = answer[: answer.index(engine.config.seg_token_id)]
    image, grid = engine_module.M3DGrid.prepare(volume)
    ids = engine.prompt_ids(question)[257:] + before_seg
    with torch.no_grad():
        tensor = model.image_tensor(image)
        embeds = torch.cat(
            [
                model.prefix_embeds(engine.loaded.prefix_id, model.image_features(tensor)),
                model.embed(torch.tensor([ids])),
            ],
            1,
        )
        hidden = model.run(embeds, None)[:, -1]
        embedding = model.seg_embedding(tensor)
        logits = model.seg_logits(embedding, hidden).numpy()
        seg_own = model.run(
            torch.cat([embeds, model.embed(torch.tensor([[engine.config.seg_token_id]]))], 1), None
        )
        other = model.seg_logits(embedding, seg_own[:, -1]).numpy()
    expected = grid.mask_to_volume(logits, logits=True)
    assert 0 < expected.sum() < expected.size  # non-trivial, so the comparison means something
    assert (mask == expected).mean() > 0.999
    assert not np.allclose(logits, other)  # the [SEG] token's own hidden would give another mask


def test_seg_written_as_plain_text_gives_a_warning(engine, monkeypatch):
    original = engine.model.logits
    planted = Planted(engine, "It is [")
    planted.tokens = (
        planted.tokens[:-1] + engine.loaded.tokenizer("SEG].", add_special_tokens=False)["input_ids"]
    )
    planted.tokens.append(engine.loaded.eos_ids[0])
    monkeypatch.setattr(engine.model, "logits", planted)
    events = run(engine, ctx_for(phantom(), "Segment the liver.", "plain"))
    assert original is not planted
    assert not any(isinstance(e, MaskOut) for e in events)
    assert any(isinstance(e, WarningOut) and "plain text" in e.message for e in events)


def test_thin_and_single_slice_volumes_work(engine, monkeypatch):
    monkeypatch.setattr(engine.model, "logits", Planted(engine, PLANTED))
    for shape in ((5, 30, 40), (1, 64, 48)):
        v = np.zeros(shape, np.float32)
        v[:, 5:20, 6:30] = 1.0
        volume = Volume.from_array(v, np.eye(4))
        engine.model.logits.calls = 0
        events = run(engine, ctx_for(volume, "Segment the liver.", f"thin{shape}"))
        mask = next(e for e in events if isinstance(e, MaskOut)).mask
        box = next(e for e in events if isinstance(e, BoxOut)).box
        assert mask.shape == shape
        assert all(-0.5 <= lo <= hi <= n - 0.5 for lo, hi, n in zip(box.lo, box.hi, shape[::-1]))


def test_user_roi_becomes_official_box_text(engine):
    volume = phantom()
    engine.prepare(volume, "roi")
    roi = IJKBox.from_voxels(8, 10, 5, 44, 49, 29)  # exactly the crop: the whole model grid
    ctx = ctx_for(volume, "What target is present within the coordinates <region> ?", "roi", roi=roi)
    text = engine.question_text(ctx, engine._volumes["roi"])
    assert (
        text == "What target is present within the coordinates "
        "<bx_start>[0.0, 0.0, 0.0, 0.969, 0.996, 0.996]<bx_end> ?"
    )
    ids = engine.prompt_ids(text)
    assert engine.loaded.tokenizer.convert_tokens_to_ids("<bx_start>") in ids[257:]
    plain = ctx_for(volume, "What is this?", "roi", roi=roi)
    assert engine.question_text(plain, engine._volumes["roi"]).startswith(
        "What is this? (the box <bx_start>["
    )
    outside = ctx_for(volume, "What is this?", "roi", roi=IJKBox.from_voxels(0, 0, 0, 2, 2, 2))
    with pytest.raises(EngineError, match="region"):
        engine.question_text(outside, engine._volumes["roi"])


def test_bad_questions(engine):
    volume = phantom()
    with pytest.raises(EngineError, match="empty"):
        run(engine, ctx_for(volume, "   "))
    with pytest.raises(EngineError, match="exceeds the model's context of 1023"):
        run(engine, ctx_for(volume, "liver spleen " * 900))
    with pytest.raises(EngineError, match="max_new_tokens"):
        run(engine, ctx_for(volume, "hi", max_new_tokens=0))


def test_long_prompt_warns_and_answer_is_capped_to_context(engine):
    events = run(engine, ctx_for(phantom(), "liver " * 300, max_new_tokens=4))
    assert isinstance(events[0], WarningOut) and "trained on" in events[0].message


def test_cancel_stops_the_stream(engine):
    cancel = threading.Event()
    cancel.set()
    assert not [
        e
        for e in engine.chat(ctx_for(phantom(), "Describe.", max_new_tokens=30), cancel)
        if isinstance(e, TokenOut)
    ]


def test_too_large_volume_is_refused(engine, monkeypatch):
    monkeypatch.setattr(engine_module, "MAX_VOXELS", 1000)
    with pytest.raises(EngineError, match="too large"):
        engine.prepare(phantom(), "huge")


def test_sampling_is_reproducible_with_a_seed(tiny_m3d):
    options = EngineOptions(model=tiny_m3d, device="cpu", extra={"temperature": 1.0, "seed": 3, "top_p": 0.9})
    texts = [
        text_of(run(create_engine("m3d", options), ctx_for(phantom(), "Describe.", max_new_tokens=12)))
        for _ in "ab"
    ]
    assert texts[0] == texts[1] and texts[0]


def test_demo_npy_identity_geometry(engine, tmp_path, monkeypatch):
    array = np.zeros((1, 32, 256, 256), np.float32)
    array[0, 4:20, 50:100, 60:200] = 1.0
    path = tmp_path / "example_00.npy"
    np.save(path, array)
    volume, grid = engine_module.load_demo_npy(str(path))
    assert volume.shape == (32, 256, 256) and np.array_equal(volume.ijk_to_ras, np.eye(4))
    engine.prepare(volume, "demo", grid=grid)
    assert torch.equal(engine._volumes["demo"].image[0, 0], torch.from_numpy(array[0]))
    monkeypatch.setattr(engine.model, "logits", Planted(engine, PLANTED))
    box = next(e for e in run(engine, ctx_for(volume, "Where?", "demo")) if isinstance(e, BoxOut)).box
    # Identity grid: d 0.1*32=3.2 .. (0.5+1/32)*32=17, h 51.2 .. 154.6, w 76.8 .. 180.2 (edges, -0.5).
    assert np.allclose(box.lo, (76.3, 50.7, 2.7)) and np.allclose(box.hi, (179.7, 154.1, 16.5))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((32, 128, 128), np.float32), r"shaped \(1, 32, 256, 256\)"),
        (np.full((1, 32, 256, 256), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((1, 32, 256, 256), np.nan, np.float32), r"\[0, 1\]"),
    ],
)
def test_demo_npy_bad_inputs(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(EngineError, match=message):
        engine_module.load_demo_npy(str(path))
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(EngineError, match="cannot read"):
        engine_module.load_demo_npy(str(tmp_path / "text.npy"))


def test_incremental_detokenizer_keeps_multibyte_characters_whole(engine):
    tok = engine.loaded.tokenizer
    text = "Lésion de 2,5 cm → 肝臓 ✓ [SEG] <bx_start>[0.1]<bx_end>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # byte-level pieces: several characters span tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_models_and_missing_model_option(engine):
    info = engine.models()[0]
    assert info.engine == "m3d" and info.capabilities.input == "volume3d"
    assert info.capabilities.boxes and info.capabilities.masks and info.capabilities.region_input
    with pytest.raises(EngineError, match="--model"):
        create_engine("m3d", EngineOptions())


def test_ask_cli_takes_the_official_demo_npy(tiny_m3d, tmp_path, capsys):
    from medmllm.cli import main

    array = np.zeros((1, 32, 256, 256), np.float32)
    array[0, 8:24, 64:192, 64:192] = 1.0
    np.save(tmp_path / "example_00.npy", array)
    out = tmp_path / "out"
    argv = ["ask", str(tmp_path / "example_00.npy"), "Where is liver in this image? Please output the box."]
    argv += ["--engine", "m3d", "--model", tiny_m3d, "--device", "cpu", "--max-new-tokens", "6"]
    assert main([*argv, "--option", "seed=3", "--out", str(out)]) == 0
    chat = json.loads((out / "chat.json").read_text(encoding="utf-8"))
    assert chat["events"][-1]["type"] == "done"
    assert main([*argv, "--option", "seed", "--out", str(out)]) == 2
    assert "--option expects KEY=VALUE" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "example_00.npy"), "hi", "--out", str(out)]) == 2
    assert "use it with --engine m3d" in capsys.readouterr().err


def contract_case(request):
    """For the engine contract suite: the tiny random M3D checkpoint (its words promise no box)."""
    engine = create_engine("m3d", EngineOptions(model=request.getfixturevalue("tiny_m3d"), device="cpu"))
    yield EngineCase(engine, phantom())
    engine.close()

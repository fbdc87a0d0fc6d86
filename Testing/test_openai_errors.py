"""Engine `openai`: every way the model server or the input can go wrong gets a sentence, not a traceback."""

from __future__ import annotations

import socket
import threading
from typing import Any, List

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer
from medmllm.engines.base import ChatContext, ChatTurn, EngineError, EngineOptions, TokenOut, ViewState
from medmllm.engines.openai import SentImage, classify_question, target_phrase
from medmllm.engines.registry import create_engine
from medmllm.geometry.volume import Volume
from medmllm.grounding.registry import dialect_for_model


def volume() -> Volume:
    voxels = np.zeros((12, 20, 24), dtype=np.int16)
    voxels[4:8, 6:12, 8:16] = 300
    return Volume.from_array(voxels, np.diag([0.7, 0.7, 3.0, 1.0]))


def ask(engine: Any, question: str = "Where is the lesion?", view: ViewState = ViewState()) -> List[Any]:
    ctx = ChatContext(volume(), "v", [ChatTurn("user", question)], view)
    return list(engine.chat(ctx, threading.Event()))


def make(base_url: str, model: str = "fake-vlm", dialect: str = "internvl", **extra: Any) -> Any:
    extra.setdefault("max_retries", 0)
    return create_engine(
        "openai", EngineOptions(model=model, base_url=base_url, dialect=dialect, extra=extra)
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EngineError, match=r"no model server at .*: is it running"):
        ask(make(url))


def test_slow_server_times_out_before_the_answer_starts() -> None:
    server = FakeOpenAIServer(lambda b, i: "late", first_delay=5.0)
    expected = r"did not answer within 0.5 s"
    with server, pytest.raises(EngineError, match=expected):
        ask(make(server.base_url, timeout=0.5))


def test_server_that_stalls_mid_answer_times_out() -> None:
    server = FakeOpenAIServer(lambda b, i: "abcdef", chunk_size=3, chunk_delay=5.0)
    expected = r"did not answer within 0.5 s"
    with server, pytest.raises(EngineError, match=expected):
        ask(make(server.base_url, timeout=0.5))


def test_wrong_api_key() -> None:
    with FakeOpenAIServer(lambda b, i: "ok", api_key="right") as server:
        engine = create_engine(
            "openai",
            EngineOptions(model="fake-vlm", base_url=server.base_url, api_key="wrong", dialect="plain"),
        )
        with pytest.raises(EngineError, match=r"rejected the API key \(401\)"):
            ask(engine)


def test_text_only_model_refuses_the_image() -> None:
    server = FakeOpenAIServer(lambda b, i: "ok", model="Qwen/Qwen3-8B", vision=False)
    with server, pytest.raises(EngineError) as info:
        ask(make(server.base_url, model="Qwen/Qwen3-8B"))
    message = str(info.value)
    assert "(400)" in message and "is not a multimodal model" in message and "does not take images" in message


def test_unknown_model_name_fails_before_anything_is_sent() -> None:
    server = FakeOpenAIServer(lambda b, i: "ok")
    expected = r"serves fake-vlm, not 'medrega-typo': fix --model or leave it out"
    with server, pytest.raises(EngineError, match=expected):
        make(server.base_url, model="medrega-typo").prepare(volume(), "v")
    assert server.requests == []


def test_a_stream_cut_mid_answer_says_so_and_keeps_the_words_so_far() -> None:
    answer = "The lesion lies in the right lobe, next to the portal vein."
    server = FakeOpenAIServer(lambda b, i: answer, chunk_size=5, cut_after=3)
    events: List[Any] = []
    with server, pytest.raises(EngineError) as info:
        for event in make(server.base_url).chat(
            ChatContext(volume(), "v", [ChatTurn("user", "What is this?")], ViewState()), threading.Event()
        ):
            events.append(event)
    message = str(info.value)
    assert "broke off the answer after 15 characters" in message and "no model server" not in message
    assert "".join(e.text for e in events if isinstance(e, TokenOut)) == answer[:15]


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (400, {"detail": "Image too small: 1x512"}, "(400): Image too small: 1x512"),
        (
            422,
            {
                "detail": [
                    {"loc": ["body", "messages", 0, "content"], "msg": "Field required", "type": "missing"}
                ]
            },
            "(422): messages.0.content: Field required",
        ),
        (
            500,
            {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}},
            "CUDA out of memory",
        ),
    ],
)
def test_error_bodies_are_unwrapped(status: int, body: Any, words: str) -> None:
    server = FakeOpenAIServer(lambda b, i: "ok", error_body=(status, body))
    with server, pytest.raises(EngineError) as info:
        ask(make(server.base_url, dialect="plain"))
    assert words in str(info.value) and "{" not in str(info.value)


def test_several_served_models_need_a_choice() -> None:
    with FakeOpenAIServer(lambda b, i: "ok", models=["a-vl", "b-vl"]) as server:
        engine = create_engine("openai", EngineOptions(base_url=server.base_url))
        with pytest.raises(EngineError, match=r"serves a-vl, b-vl: choose one with --model"):
            ask(engine)


def test_slice_index_out_of_range() -> None:
    server = FakeOpenAIServer(lambda b, i: "ok")
    expected = r"axial slice index 40 is out of range: valid 0\.\.11"
    with server, pytest.raises(EngineError, match=expected):
        ask(make(server.base_url), view=ViewState("axial", 40))
    assert server.requests == []  # nothing was sent


def test_unknown_orientation() -> None:
    server = FakeOpenAIServer(lambda b, i: "ok")
    expected = "orientation must be one of"
    with server, pytest.raises(EngineError, match=expected):
        ask(make(server.base_url), view=ViewState("oblique", 3))


URL = "http://gpu-box:1/v1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(model="m"), "needs --base-url"),
        (EngineOptions(model="m", base_url="localhost:8000"), "must be an http"),
        (EngineOptions(model="m", base_url="http://h:1/v1", dialect="klingon"), "unknown dialect 'klingon'"),
        (
            EngineOptions(model="m", base_url="http://h:1/v1", extra={"segmenter": "sam9"}),
            "unknown segmenter",
        ),
        (EngineOptions(model="m", base_url="http://h:1/v1", extra={"max_images": "many"}), "max_images must"),
        (EngineOptions(model="m", base_url="http://h:1/v1", extra={"max_images": 0}), "max_images must"),
    ],
)
def test_bad_options(options: EngineOptions, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        create_engine("openai", options)


def test_stream_that_is_not_json() -> None:
    server = FakeOpenAIServer(lambda b, i: "", raw_stream="data: <html>502 Bad Gateway</html>\n\n")
    with server, pytest.raises(EngineError, match="not an OpenAI chat stream"):
        ask(make(server.base_url))


def test_error_event_in_the_middle_of_the_stream() -> None:
    # vLLM reports failures after the headers as one `data: {"error": ...}` event
    chunk = '{"id":"c","object":"chat.completion.chunk","created":0,"model":"fake-vlm",'
    chunk += '"choices":[{"index":0,"delta":{"content":"The "},"finish_reason":null}]}'
    error = '{"error":{"message":"CUDA out of memory","type":"InternalServerError","code":500}}'
    server = FakeOpenAIServer(lambda b, i: "", raw_stream=f"data: {chunk}\n\ndata: {error}\n\n")
    with server, pytest.raises(EngineError, match="CUDA out of memory"):
        ask(make(server.base_url))


def test_bad_timeout_option() -> None:
    with pytest.raises(EngineError, match="timeout must be a positive number"):
        create_engine("openai", EngineOptions(model="m", base_url=URL, extra={"timeout": "-3"}))


def test_base_url_without_path_gets_v1() -> None:
    engine = create_engine("openai", EngineOptions(model="m", base_url="http://gpu-box:8000"))
    assert engine.base_url == "http://gpu-box:8000/v1"


def test_text_still_arrives_when_the_box_is_malformed() -> None:
    answer = "<ref>lesion</ref><box>[[12, 40, oops]]</box> near the liver"
    with FakeOpenAIServer(lambda b, i: answer) as server:
        events = ask(make(server.base_url))
    assert "".join(e.text for e in events if isinstance(e, TokenOut)) == answer
    assert any(type(e).__name__ == "WarningOut" for e in events)


@pytest.mark.parametrize(
    ("model", "dialect"),
    [
        ("Luxuriant16/medrega", "internvl"),
        ("OpenGVLab/InternVL2_5-8B", "internvl"),
        ("lingshu-medical-mllm/Lingshu-32B", "qwen25vl"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen25vl"),
        ("google/medgemma-1.5-4b-it", "medgemma"),
        ("minigpt-med", "minigptmed"),
        ("llava-hf/llava-1.5-7b-hf", "plain"),
        (None, "plain"),
    ],
)
def test_dialect_guess(model: Any, dialect: str) -> None:
    assert dialect_for_model(model) == dialect


@pytest.mark.parametrize(
    ("question", "task", "phrase"),
    [
        ("Where is the left kidney?", "ground", "left kidney"),
        ("Please segment the liver in this CT scan.", "segment", "liver"),
        ("Can you locate the tumor?", "ground", "tumor"),
        ("请定位胰腺癌", "ground", "胰腺癌"),
        ("Write a report of the findings", "report", None),
        ("What is this?", "chat", None),
    ],
)
def test_question_classification(question: str, task: str, phrase: Any) -> None:
    assert classify_question(question) == task
    if phrase is not None:
        assert target_phrase(question) == phrase


def test_padding_mapping_round_trips() -> None:
    sent = SentImage(b"", (896, 896), (0.0, 1 / 12, 1.0, 11 / 12))
    box = (0.1, 0.2, 0.7, 0.9)
    assert np.allclose(sent.to_slice(sent.from_slice(box)), box)
    assert np.allclose(sent.to_slice((0.0, 1 / 12, 1.0, 11 / 12)), (0.0, 0.0, 1.0, 1.0))

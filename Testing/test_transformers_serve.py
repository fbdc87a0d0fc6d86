"""Engine `openai` against a real OpenAI-compatible server: Hugging Face's own `transformers serve`.

Opt-in (`-m real_server`): it needs a Python with `transformers[serving]` and torchvision (the Qwen
processors), named by MEDMLLM_SERVING_PYTHON, e.g. a venv made with
`pip install torch==2.14.1 torchvision==0.29.1 'transformers[serving]'`. Each checkpoint is a tiny
random Qwen2.5-VL built by `scripts/make_tiny_qwen25vl.py` with a locally trained tokenizer and
the processor range of Qwen's README (256*28*28 .. 1280*28*28); it answers one fixed text (what
a perfect model would say about the phantom lesion in the image the engine sends), so what is under
test is the real server's request handling, image resizing, streaming and decoding.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import numpy as np
import pytest
import requests
from fake_openai_server import INTERNVL_SPECIAL_TOKENS, grounded_answer
from medmllm.engines.base import BoxOut, EngineOptions, TokenOut, ViewState, WarningOut
from medmllm.engines.openai import prepare_image
from medmllm.engines.registry import create_engine
from medmllm.geometry.slices import export_slice
from medmllm.grounding.registry import get_dialect
from PIL import Image
from test_openai_engine import context, phantom, ras_offset_in_voxels

pytestmark = pytest.mark.real_server

MAKER = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_qwen25vl.py"
VIEW = ViewState("axial", 20)


def _serving_python() -> str:
    python = os.environ.get("MEDMLLM_SERVING_PYTHON")
    if not python or not Path(python).exists():
        pytest.fail("set MEDMLLM_SERVING_PYTHON to a Python with transformers[serving] and torchvision")
    return python


def _sent_image(dialect: str) -> Image.Image:
    """The PNG the engine sends for VIEW, made by the engine's own code."""
    import io

    view = export_slice(phantom(), VIEW.orientation, index=VIEW.index)
    sent = prepare_image(view.pixels, get_dialect(dialect).image)
    return Image.open(io.BytesIO(sent.png))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(folder: Path, log: Path) -> Iterator[str]:
    python = _serving_python()
    port = _free_port()
    command = [str(Path(python).parent / "transformers"), "serve", str(folder), "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--device", "cpu", "--log-level", "info"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"transformers serve exited: {log.read_text()[-2000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not start in 300 s"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _checkpoint(folder: Path, answer: str, *special: str) -> Path:
    args = [_serving_python(), str(MAKER), str(folder), "--answer", answer]
    subprocess.run([*args, "--special", *special] if special else args, check=True, timeout=600)
    return folder


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("qwen")
    folder = _checkpoint(
        root / "Qwen2.5-VL-tiny-random", grounded_answer("qwen25vl", _sent_image("qwen25vl"), "lesion")
    )
    for url in _serve(folder, root / "serve.log"):
        yield url, folder


@pytest.fixture(scope="module")
def internvl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("internvl")
    answer = grounded_answer("internvl", _sent_image("internvl"), "lesion")
    folder = _checkpoint(root / "tiny-internvl-box-grammar", answer, *INTERNVL_SPECIAL_TOKENS)
    for url in _serve(folder, root / "serve.log"):
        yield url, root / "serve.log"


def _ask(options: EngineOptions) -> List[Any]:
    engine = create_engine("openai", options)
    try:
        return list(engine.chat(context("Where is the lesion?", VIEW), threading.Event()))
    finally:
        engine.close()


def _one_box_on_the_lesion(events: List[Any]) -> BoxOut:
    boxes = [e for e in events if isinstance(e, BoxOut)]
    assert len(boxes) == 1 and boxes[0].label == "lesion"
    assert np.all(np.abs(ras_offset_in_voxels(phantom(), boxes[0].box)) <= 0.5)
    return boxes[0]


def test_without_model_or_dialect_a_cookbook_configured_qwen_server_puts_the_box_on_the_lesion(
    qwen_server: Any,
) -> None:
    url, folder = qwen_server
    events = _ask(EngineOptions(base_url=url, extra={"timeout": 120}))
    box = _one_box_on_the_lesion(events)
    assert box.source["dialect"] == "qwen25vl" and box.source["values"]
    assert [e for e in events if isinstance(e, TokenOut)] and not [
        e for e in events if isinstance(e, WarningOut)
    ]
    # the image we sent is the image the model saw: the checkpoint's processor keeps its size
    width, height = box.source["image_size"]
    grid = subprocess.run(
        [_serving_python(), str(MAKER), str(folder), "--grid", f"{width}x{height}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert grid.stdout.strip().splitlines()[-1] == f"{width}x{height}"


def test_a_server_that_refuses_skip_special_tokens_is_asked_again_and_the_box_lands(
    internvl_server: Any,
) -> None:
    # transformers serve validates its fields: `skip_special_tokens` gets 422 "Unexpected fields in
    # the request"; the engine asks again without it. (This server keeps the special tokens of a
    # qwen2_5_vl checkpoint anyway, because its response parser decodes with them, so the tagged
    # form arrives; the stripped form is covered by the fake server and the corpus.)
    url, log = internvl_server
    events = _ask(EngineOptions(base_url=url, dialect="internvl", extra={"timeout": 120}))
    _one_box_on_the_lesion(events)
    statuses = [
        line.split('HTTP/1.1" ')[1] for line in log.read_text().splitlines() if "POST /v1/chat" in line
    ]
    assert statuses == ["422 Unprocessable Entity", "200 OK"]
    text = "".join(e.text for e in events if isinstance(e, TokenOut))
    assert (
        text.replace("<ref>", "")
        .replace("</ref>", "")
        .replace("<box>", "")
        .replace("</box>", "")
        .startswith("lesion[[")
    )

"""Fuzzing in CI: the properties of scripts/fuzz.py (every dialect parser, the upload decoder, PUT on a
live server) on a few hundred generated cases each; `scripts/fuzz` runs 100 000."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import load_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medmllm.geometry.wire import WireError, decode_volume, encode_volume
from medmllm.grounding.registry import dialect_names

ROOT = Path(__file__).resolve().parents[1]


def _load_fuzz():
    return load_script("fuzz")


fuzz = _load_fuzz()
FAST = settings(
    max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@FAST
@given(fuzz.dialect_cases())
def test_every_dialect_survives_any_text_and_any_chunking(case):
    fuzz.check_dialect(*case)


def test_the_fuzzer_covers_every_registered_dialect():
    seen = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(fuzz.dialect_cases())
    def collect(case):
        seen.add(case[0])

    collect()
    assert seen == set(dialect_names())


def test_the_dialect_check_catches_a_parser_that_depends_on_chunking(monkeypatch):
    from medmllm.grounding.base import ParseWarning

    real = fuzz._run_parser

    def flaky(name, size, pieces):
        pieces = list(pieces)
        return real(name, size, pieces) + [ParseWarning("x")] * (len(pieces) > 1)

    monkeypatch.setattr(fuzz, "_run_parser", flaky)
    with pytest.raises(AssertionError, match="chunking"):
        fuzz.check_dialect("internvl", "<ref>a</ref><box>[[1,2,3,4]]</box>", [5], (64, 64))


MEMORY_CASES = [
    (name, what)
    for name in dialect_names()
    for what in fuzz.hostile_streams(name)
    if "never closed" in what or "endless" in what
]


@pytest.mark.parametrize(("name", "what"), MEMORY_CASES, ids=[f"{n}-{w}" for n, w in MEMORY_CASES])
def test_parser_memory_stays_bounded_on_hostile_streams(name, what):
    prefix, body = fuzz.hostile_streams(name)[what]
    assert fuzz.check_memory(name, prefix, body, chars=100_000) <= fuzz.MEMORY_PEAK_BYTES


@pytest.mark.parametrize("name", dialect_names())
def test_parser_memory_stays_bounded_on_floods(name):
    for what, (prefix, body) in fuzz.hostile_streams(name).items():
        if "flood" in what:
            fuzz.check_memory(name, prefix, body, chars=8_000)


def test_the_memory_check_catches_a_parser_that_keeps_everything(monkeypatch):
    from medmllm.grounding.registry import get_dialect

    class Hoarder:
        def __init__(self):
            self.kept = []

        def feed(self, chunk):
            self.kept.append(chunk * 2)
            return []

        def finish(self):
            return []

    monkeypatch.setattr(type(get_dialect("plain")), "parser", lambda self, size=None: Hoarder())
    with pytest.raises(AssertionError, match="grew"):
        fuzz.check_memory("plain", "", "abc", chars=20_000)


@FAST
@given(fuzz.upload_bodies(), st.sampled_from([16, 200, fuzz.WIRE_LIMIT]))
def test_decode_volume_returns_a_consistent_volume_or_a_wire_error(body, limit):
    fuzz.check_decode(body, limit)


def _header(**fields):
    header = {
        "magic": "medmllm-volume/1",
        "dtype": "<i2",
        "shape": [2, 2, 2],
        "ijk_to_ras": np.eye(4).tolist(),
    }
    header.update(fields)
    return json.dumps(header).encode() + b"\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_header(shape=[2**40, 2**40, 2**40]), "over the limit"),
        (_header(shape=[2, 2, -2]), "positive"),
        (_header(shape=[2.0, 2, 2]), "positive"),
        (_header(shape=[True, 2, 2]), "positive"),
        (_header(dtype="|O"), "dtype"),
        (_header(dtype=">i2"), "dtype"),
        (_header(ijk_to_ras=[[float("nan")] * 4] * 4), "finite"),
        (_header(ijk_to_ras="eye"), "4x4"),
        (_header(magic="medmllm-volume/2"), "magic"),
        (b'{"magic": 1e999}\n', "magic"),
        (_header() + bytes(15), "truncated"),
        (_header() + bytes(17), "mismatch"),
        (b'{"magic":' + b" " * 5000 + b"\n", "too long"),
        (b"\x1f\x8b\x08\x00", "magic"),
    ],
)
def test_malformed_headers_get_a_wire_error_that_says_why(body, message):
    with pytest.raises(WireError, match=message):
        decode_volume(body, 1 << 20)


def test_a_json_box_with_an_overflowing_number_is_a_warning_not_infinity():
    """Found by scripts/fuzz: `1e+999` parses to inf in the JSON path of the qwen25vl parser."""
    from medmllm.grounding.registry import get_dialect

    text = 'here: {"bbox_2d": [1e+999, 114, 1016, 672], "label": "house"}'
    result = get_dialect("qwen25vl").parse(text, (1024, 768))
    assert result.boxes == [] and result.warnings


HOSTILE_HEADERS = {
    "deeply nested header JSON": b'{"magic":' + b"[" * 2000 + b"]" * 2000 + b"}\n",
    "dtype that is a JSON list": (
        b'{"magic":"medmllm-volume/1","dtype":[1],"shape":[1,1,1],"ijk_to_ras":[]}\n\x01'
    ),
}


@pytest.mark.parametrize("what", sorted(HOSTILE_HEADERS))
def test_hostile_headers_found_by_fuzzing_are_wire_errors(what):
    with pytest.raises(WireError):
        decode_volume(HOSTILE_HEADERS[what], 1 << 20)


UPLOAD_LIMIT = 1 << 18


@pytest.fixture
def upload_server(serve):
    return serve(max_volume_bytes=UPLOAD_LIMIT)


@settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(put=fuzz.upload_requests())
def test_fuzzed_uploads_get_4xx_and_leave_the_store_clean(upload_server, put):
    fuzz.check_upload(upload_server.url, upload_server.store, *put)


@settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(body=fuzz.chat_bodies())
def test_fuzzed_chat_requests_get_a_json_4xx_never_a_500(upload_server, body):
    fuzz.check_chat(upload_server.url, *body)


def test_a_gzip_bomb_is_refused_with_413(upload_server):
    volume_id, body = fuzz.gzip_bomb()
    assert len(body) < 100_000
    headers = {"Content-Encoding": "gzip"}
    response = requests.put(
        f"{upload_server.url}/v1/volumes/{volume_id}", data=body, headers=headers, timeout=30
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    fuzz.check_store(upload_server.store, verify_hashes=True)


def test_a_valid_upload_through_the_fuzz_check_is_stored_intact(upload_server):
    from conftest import wait_until

    body = encode_volume((np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)))
    volume_id = hashlib.sha256(body).hexdigest()
    fuzz.check_upload(
        upload_server.url, upload_server.store, volume_id, gzip.compress(body), {"Content-Encoding": "gzip"}
    )
    stored = upload_server.store / "volumes" / f"{volume_id}.vol"
    assert wait_until(stored.is_file)
    fuzz.check_store(upload_server.store, verify_hashes=True)


def test_the_store_check_catches_a_file_outside_the_store_layout(tmp_path):
    (tmp_path / "volumes").mkdir()
    (tmp_path / "volumes" / ("0" * 64 + ".vol")).write_bytes(b"half")
    with pytest.raises(AssertionError, match="sha256"):
        fuzz.check_store(tmp_path, verify_hashes=True)
    (tmp_path / "evil.txt").write_text("x")
    with pytest.raises(AssertionError, match="outside"):
        fuzz.check_store(tmp_path)
    (tmp_path / "evil.txt").unlink()
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "abc-1.part").write_bytes(b"half")
    with pytest.raises(AssertionError, match="half-written"):
        fuzz.check_store(tmp_path)


def test_the_fuzz_driver_counts_cases_and_reports_failures(monkeypatch, capsys):
    assert fuzz.main(["--cases", "30", "--only", "dialects"]) == 0
    assert "dialects       30 cases  0 failures" in capsys.readouterr().out

    def broken(body, limit):
        raise AssertionError("planted failure")

    monkeypatch.setattr(fuzz, "check_decode", broken)
    assert fuzz.main(["--cases", "5", "--only", "wire"]) == 1
    out = capsys.readouterr().out
    assert "planted failure" in out and "total" in out and "1 failures" in out
    with pytest.raises(SystemExit):
        fuzz.main(["--only", "everything"])

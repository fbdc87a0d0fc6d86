"""Property-based fuzzing of everything that reads untrusted input: every grounding dialect's
streaming parser, the volume upload decoder, and `PUT /v1/volumes/{id}` on a real server.

`scripts/fuzz [--cases 100000] [--seed 0] [--only dialects,memory,wire,http]` prints the cases run
per target and each failure (hypothesis' shrunk input and the error); exit status 1 if any failed.
Testing/test_fuzz_*.py check the same properties with a small count. The properties:

- dialects: `feed`/`finish` never raise on any text; the events are the same however the text is
  chunked and equal `Dialect.parse`; boxes are normalised (fractions in [0, 1], lo <= hi, offsets
  inside the text); warnings are capped; `strip` returns text.
- memory: a hostile stream (an opener never closed, brace floods, endless boxes) fed in pieces keeps
  the parser's memory bounded: three times the text, no more memory.
- wire: `decode_volume` on random and mutated bodies either returns a consistent volume within the
  byte limit or raises `WireError`, nothing else.
- http: random and mutated uploads (gzip, bombs, bad encodings, ids that look like paths) get a
  4xx with a sentence, never a 5xx; the server stays up; nothing lands outside its store. Chat
  requests with hostile JSON values (NaN, Infinity, lone surrogates, wrong types) get a JSON 4xx.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import math
import sys
import tempfile
import time
import traceback
import tracemalloc
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "Testing" / "data" / "model_outputs" / "corpus.json"
TARGETS = ("dialects", "memory", "wire", "http")
WIRE_LIMIT = 1 << 16
HTTP_LIMIT_MB = 0.25
MEMORY_STREAM_CHARS = 100_000
MEMORY_PEAK_BYTES = 1 << 20
MAX_WARNING_CHARS = 300
UPLOAD_STATUSES = {201, 400, 404, 405, 411, 413, 415, 422}
CHAT_STATUSES = {400, 404, 409, 413, 422}

# ----- dialect text --------------------------------------------------------------------------------

GENERIC_FRAGMENTS = (
    "<box>", "</box>", "<ref>", "</ref>", "[[", "]]", "[", "]", "<p>", "</p>", "{<", ">}", "<", ">",
    "<delim>", "[SEG]", "<bx_start>", "<bx_end>", "{", "}", '"bbox_2d": ', '"box_2d": ', '"label": "x"',
    '"label": ', ":", ",", ", ", "\n", "\r\n", " ", "```json", "```", "<unused94>", "<unused95>", '"',
    "'", "\\", "\\u0000", "胰", "\U0001f600", "\x00", "\x01", "<im_patch>", "</s>", "[grounding]",
    "[identify]", "<img>", "[[1,2,3,4]]", "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]", "{<10><20><30><40>}",
    '{"bbox_2d": [1, 2, 3, 4], "label": "a"}', '{"box_2d": [10, 20, 30, 40], "label": "b"}',
    "javascript:alert(1)", "](http://evil.example/x)", "<a href='x'>", "<script>",
)  # fmt: skip

NUMBER_TEXTS = (
    "0", "-0", "1", "-1", "999", "1000", "0.5", ".5", "5.", "1e3", "1e309", "-1e309", "1e-400", "nan",
    "inf", "NaN", "Infinity", "99999999999999999999999", "+7", "--3", "1,2", "0x10", "١٢",
)  # fmt: skip


def _corpus_texts() -> List[str]:
    if not CORPUS.is_file():
        return ["<ref>lung</ref><box>[[1,2,3,4]]</box>"]
    return [case["text"] for case in json.loads(CORPUS.read_text("utf-8"))]


def _dialect_names() -> List[str]:
    from medmllm.grounding.registry import dialect_names

    return dialect_names()


def _markup_pieces() -> st.SearchStrategy[str]:
    numbers = st.one_of(
        st.sampled_from(NUMBER_TEXTS),
        st.integers(-(10**6), 10**6).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    )
    return st.one_of(
        st.sampled_from(GENERIC_FRAGMENTS),
        numbers,
        st.text(max_size=6),
        st.characters(codec=None, exclude_categories=()).map(str),
    )


@st.composite
def model_texts(draw: Callable) -> str:
    """Random markup soup, or a real answer from the corpus with pieces spliced in or cut out."""
    pieces = draw(st.lists(_markup_pieces(), max_size=60))
    if draw(st.booleans()):
        return "".join(pieces)
    text = draw(st.sampled_from(_corpus_texts()))
    for piece in pieces[:8]:
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + piece + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(0, 20)) :]
    return text


@st.composite
def dialect_cases(draw: Callable) -> Tuple[str, str, List[int], Tuple[int, int]]:
    """(dialect name, text, cut positions, image size)."""
    name = draw(st.sampled_from(_dialect_names()))
    text = draw(model_texts())
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=16)))
    size = (draw(st.integers(1, 4096)), draw(st.integers(1, 4096)))
    return name, text, cuts, size


def _run_parser(name: str, image_size: Tuple[int, int], pieces: Iterable[str]) -> List[Any]:
    from medmllm.grounding.registry import get_dialect

    parser = get_dialect(name).parser(image_size)
    events: List[Any] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def check_dialect(name: str, text: str, cuts: Sequence[int], image_size: Tuple[int, int]) -> None:
    """Raises AssertionError (or whatever the parser raised) if a dialect property fails."""
    from medmllm.grounding.base import BoxFound, ParseWarning, SegFound
    from medmllm.grounding.registry import get_dialect
    from medmllm.grounding.toolkit import LABEL_CHARS, MAX_WARNINGS

    dialect = get_dialect(name)
    whole = _run_parser(name, image_size, [text])
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert _run_parser(name, image_size, pieces) == whole, "events depend on chunking"
    if len(text) <= 200:
        assert _run_parser(name, image_size, text) == whole, "char-by-char events differ"
    result = dialect.parse(text, image_size)
    assert result.boxes == [e for e in whole if isinstance(e, BoxFound)], "parse() differs from feed()"
    warnings = [e for e in whole if isinstance(e, ParseWarning)]
    assert len(warnings) <= MAX_WARNINGS + 1, f"{len(warnings)} warnings: not capped"
    for event in whole:
        assert isinstance(event, (BoxFound, SegFound, ParseWarning)), f"unknown event {event!r}"
        if isinstance(event, ParseWarning):
            assert isinstance(event.message, str) and len(event.message) <= MAX_WARNING_CHARS
            continue
        assert 0 <= event.start <= event.end <= len(text), f"offsets outside the text: {event!r}"
        assert event.label is None or (isinstance(event.label, str) and len(event.label) <= LABEL_CHARS)
        if isinstance(event, BoxFound):
            _check_box(event)
    assert isinstance(dialect.strip(text), str)


def _check_box(box: Any) -> None:
    fractions = box.fractions
    assert len(fractions) in (4, 6), f"box with {len(fractions)} fractions: {box!r}"
    assert all(isinstance(f, float) and math.isfinite(f) and 0.0 <= f <= 1.0 for f in fractions), box
    half = len(fractions) // 2
    assert all(a <= b for a, b in zip(fractions[:half], fractions[half:])), f"lo > hi: {box!r}"
    assert all(math.isfinite(v) for v in box.values), f"non-finite value kept: {box!r}"


# ----- parser memory -------------------------------------------------------------------------------


def hostile_streams(name: str) -> Dict[str, Tuple[str, str]]:
    """(prefix, repeated body) pairs meant to make a parser buffer forever, for one dialect."""
    from medmllm.grounding.registry import get_dialect

    rules = get_dialect(name).parser((64, 64)).rules
    streams = {f"open {r.opener!r} never closed": (r.opener, "1, 2, 3 lorem ") for r in rules}
    streams.update({f"{r.opener!r} flood": ("", r.opener) for r in rules})
    streams["brace flood"] = ("", "{")
    streams["bracket flood"] = ("", "[")
    streams["endless boxes"] = ("", "<ref>x</ref><box>[[1,2,3,4]]</box> {<1><2><3><4>} [0,0,0,1,1,1] ")
    streams["endless json boxes"] = ("", '{"bbox_2d": [1, 2, 3, 4], "box_2d": [1, 2, 3, 4]} ')
    streams["unterminated string"] = ('{"label": "', "a")
    return streams


def peak_memory(name: str, prefix: str, body: str, total_chars: int) -> int:
    """Peak traced bytes while feeding `prefix` + `body` repeated to `total_chars`, in odd-sized
    pieces, dropping the events (what a caller that streams them on does)."""
    from medmllm.grounding.registry import get_dialect

    piece = (body * (1 + 997 // len(body)))[:997]
    parser = get_dialect(name).parser((64, 64))
    tracemalloc.start()
    try:
        parser.feed(prefix)
        for _ in range(total_chars // len(piece)):
            parser.feed(piece)
        parser.finish()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_memory(name: str, prefix: str, body: str, chars: int = MEMORY_STREAM_CHARS) -> int:
    """Memory stays bounded: the peak for a stream three times longer is no higher (within a slack
    far below the extra text) and under MEMORY_PEAK_BYTES. Returns the longer stream's peak."""
    short = peak_memory(name, prefix, body, chars)
    long = peak_memory(name, prefix, body, 3 * chars)
    assert long <= short + chars // 2, f"{name}: peak grew from {short} to {long} bytes with 3x the text"
    assert long <= MEMORY_PEAK_BYTES, f"{name}: parser peaked at {long} bytes on a hostile stream"
    return long


# ----- upload bodies ------------------------------------------------------------------------------

HEADER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.sampled_from(["<i2", ">i2", "|u1", "|b1", "<f8", "|O", "<c16", "V8", "S3", "<M8[s]", "<U4", "int16"]),
    st.lists(st.integers(-3, 2**40), max_size=5),
    st.just([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
    st.just([[float("nan")] * 4] * 4),
    st.just([["a"] * 4] * 4),
)


@st.composite
def small_volumes(draw: Callable) -> Tuple[np.ndarray, np.ndarray]:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=3, max_size=3)))
    dtype = draw(st.sampled_from(["bool", "uint8", "int8", "int16", "uint16", "int32", "float32", "float64"]))
    voxels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(-50, 50, shape).astype(dtype)
    matrix = np.eye(4)
    matrix[:3, :3] *= draw(st.floats(0.1, 5.0))
    return voxels, matrix


@st.composite
def upload_bodies(draw: Callable) -> bytes:
    """Random bytes, or a valid upload mutated: truncated, extended, bytes flipped, header fields
    replaced or added, header made too long or left without its newline."""
    from medmllm.geometry.wire import MAX_HEADER_BYTES, encode_volume

    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    body = bytearray(encode_volume(draw(small_volumes())))
    header_end = body.index(b"\n")
    mutation = draw(st.sampled_from(["none", "truncate", "extend", "flip", "field", "long", "newline"]))
    if mutation == "truncate":
        del body[draw(st.integers(0, len(body))) :]
    elif mutation == "extend":
        body += draw(st.binary(min_size=1, max_size=64))
    elif mutation == "flip":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(body) - 1))
            body[at] ^= draw(st.integers(1, 255))
    elif mutation == "field":
        header = json.loads(body[:header_end])
        header[draw(st.sampled_from(["magic", "dtype", "shape", "ijk_to_ras", "extra"]))] = draw(
            HEADER_VALUES
        )
        text = json.dumps(header, allow_nan=True).encode("utf-8")
        body[:header_end] = text
    elif mutation == "long":
        body[header_end - 1 : header_end - 1] = b" " * MAX_HEADER_BYTES
    elif mutation == "newline":
        body[header_end : header_end + 1] = b" "
    return bytes(body)


def check_decode(body: bytes, max_bytes: int) -> None:
    from medmllm.geometry.wire import WireError, decode_volume, encode_volume

    try:
        voxels, matrix = decode_volume(body, max_bytes)
    except WireError as exc:
        assert str(exc), "WireError without a message"
        return
    assert voxels.ndim == 3 and voxels.nbytes <= max_bytes
    assert matrix.shape == (4, 4) and np.all(np.isfinite(matrix))
    back, back_matrix = decode_volume(encode_volume((voxels, matrix)), max_bytes)
    assert np.array_equal(back, voxels, equal_nan=voxels.dtype.kind == "f")
    assert np.array_equal(back_matrix, matrix)


# ----- uploads over HTTP --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def gzip_bomb(inflated_bytes: int = 64 << 20) -> Tuple[str, bytes]:
    """(sha256 of the inflated upload, its gzip): a valid header and zeros, ~1000x smaller packed."""
    shape = [inflated_bytes >> 20, 1024, 1024]
    header = {"magic": "medmllm-volume/1", "dtype": "|u1", "shape": shape, "ijk_to_ras": np.eye(4).tolist()}
    head = json.dumps(header, separators=(",", ":")).encode() + b"\n"
    digest = hashlib.sha256(head)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(head)]
    zeros = bytes(1 << 20)
    for _ in range(inflated_bytes >> 20):
        digest.update(zeros)
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    return digest.hexdigest(), b"".join(parts)


@st.composite
def upload_requests(draw: Callable) -> Tuple[str, bytes, Dict[str, str]]:
    """(volume id as sent in the URL, body, headers) for one PUT."""
    body = draw(upload_bodies())
    digest = hashlib.sha256(body).hexdigest()
    bomb = draw(st.integers(0, 19)) == 0
    if bomb:
        digest, body = gzip_bomb()
    volume_id = draw(
        st.one_of(
            st.just(digest),
            st.text("0123456789abcdef", min_size=64, max_size=64),
            st.sampled_from(["..", "../../etc/passwd", "%2e%2e%2f%2e%2e", "a" * 65, digest.upper(), "", " "]),
            st.text(max_size=70),
        )
    )
    headers = {"Content-Type": "application/octet-stream"}
    encoding = "gzip" if bomb else draw(st.sampled_from([None, None, "gzip", "identity", "br", "gzip, gzip"]))
    if encoding == "gzip" and not bomb and draw(st.booleans()):
        body = gzip.compress(body, compresslevel=1)
        body += draw(st.sampled_from([b"", b"", b"\0" * 64, gzip.compress(b"second member")]))
    if encoding:
        headers["Content-Encoding"] = encoding
    return volume_id, body, headers


def check_upload(base_url: str, store: Path, volume_id: str, body: bytes, headers: Dict[str, str]) -> None:
    """One PUT: a 2xx/4xx with a JSON sentence, the server still answering, the store clean."""
    from urllib.parse import quote

    import requests

    url = f"{base_url}/v1/volumes/{quote(volume_id, safe='%')}"
    response = requests.put(url, data=body, headers=headers, timeout=30)
    assert response.status_code in UPLOAD_STATUSES, (
        f"PUT answered {response.status_code}: {response.text[:200]}"
    )
    if response.status_code >= 400 and response.status_code != 405:
        detail = response.json().get("detail")
        assert detail, f"{response.status_code} without a detail"
    assert requests.get(f"{base_url}/healthz", timeout=10).status_code == 200, "server stopped answering"
    check_store(store)


#: Any JSON value, including what Python's parser accepts beyond the standard (NaN, Infinity) and
#: strings with lone surrogates (written as \\udXXX escapes).
_HOSTILE_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(exclude_categories=()), max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_CHAT_FIELDS = (
    "volume_id",
    "session_id",
    "question",
    "messages",
    "view",
    "roi",
    "model",
    "max_new_tokens",
    "temperature",
)


@st.composite
def chat_bodies(draw: Callable) -> Tuple[bytes]:
    """A POST /v1/chat body: a well-formed request with some fields replaced by hostile values."""
    body: Dict[str, Any] = {"volume_id": "0" * 64, "question": "where is the liver?"}
    for name in draw(st.lists(st.sampled_from(_CHAT_FIELDS), max_size=4)):
        body[name] = draw(_HOSTILE_VALUES)
    return (json.dumps(body).encode("ascii"),)


def check_chat(base_url: str, body: bytes) -> None:
    """One hostile chat request: a 4xx with a JSON detail, never a 5xx or a plain-text error."""
    import requests

    headers = {"Content-Type": "application/json"}
    response = requests.post(f"{base_url}/v1/chat", data=body, headers=headers, timeout=30)
    assert response.status_code in CHAT_STATUSES, (
        f"chat answered {response.status_code}: {response.text[:200]}"
    )
    assert response.json().get("detail"), f"{response.status_code} without a detail"


STORE_FOLDERS = ("volumes", "tmp", "results", "sessions")


def check_store(store: Path, verify_hashes: bool = False) -> None:
    """Only the store's own folders may hold files, no upload is left half-written in `tmp/` once
    its answer came, stored volumes are named `<sha256>.vol`, and (with `verify_hashes`) each one's
    bytes hash to its name."""
    from medmllm.protocol import is_volume_id

    for path in store.rglob("*"):
        relative = path.relative_to(store)
        assert relative.parts[0] in STORE_FOLDERS, f"written outside the store: {relative}"
        assert relative.parts[0] != "tmp" or path.is_dir(), f"half-written upload left: {relative}"
        if relative.parts[0] != "volumes" or path.is_dir():
            continue
        assert path.suffix == ".vol" and is_volume_id(path.stem), f"unexpected file {relative}"
        if verify_hashes:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == path.stem, f"{relative} holds bytes with sha256 {digest}"


# ----- driver -------------------------------------------------------------------------------------


def run_property(
    strategy: st.SearchStrategy, check: Callable[..., None], cases: int, seed_value: int
) -> Tuple[int, Optional[str]]:
    """Run `check(*example)` on `cases` examples; (examples run, failure text or None)."""
    count = [0]

    @seed(seed_value)
    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
        print_blob=False,
    )
    @given(strategy)
    def prop(example: Tuple[Any, ...]) -> None:
        count[0] += 1
        check(*example)

    try:
        prop()
    except Exception as exc:  # hypothesis re-raises the shrunk failure, its example in __notes__
        return count[0], "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return count[0], None


def _split(total: int, targets: Sequence[str]) -> Dict[str, int]:
    weights = {"dialects": 0.7, "wire": 0.2, "http": 0.1, "memory": 0.0}
    share = sum(weights[t] for t in targets) or 1.0
    return {t: max(1, int(total * weights[t] / share)) for t in targets}


def fuzz_memory() -> Tuple[int, List[str]]:
    failures, count = [], 0
    for name in _dialect_names():
        for what, (prefix, body) in hostile_streams(name).items():
            count += 1
            try:
                check_memory(name, prefix, body)
            except Exception as exc:
                failures.append(f"{name} / {what}: {type(exc).__name__}: {exc}")
    return count, failures


def fuzz_http(cases: int, seed_value: int) -> Tuple[int, Optional[str]]:
    with tempfile.TemporaryDirectory(prefix="medmllm-fuzz-") as folder:
        from load import start_server  # scripts/ is on sys.path when this runs as a script

        store = Path(folder) / "store"
        proc, url = start_server(store, "--max-volume-mb", str(HTTP_LIMIT_MB))
        try:
            count, failure = run_property(
                upload_requests(), lambda *req: check_upload(url, store, *req), cases - cases // 4, seed_value
            )
            chats, chat_failure = run_property(
                chat_bodies(), lambda body: check_chat(url, body), max(1, cases // 4), seed_value
            )
            count += chats
            failure = "\n".join(f for f in (failure, chat_failure) if f) or None
            try:
                check_store(store, verify_hashes=True)
            except AssertionError as exc:
                failure = f"{failure or ''}\nstore after the run: {exc}".strip()
            return count, failure
        finally:
            proc.terminate()
            proc.wait(10)


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.filterwarnings("ignore", category=HypothesisWarning)  # long reprs of failing uploads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000, help="generated cases in all (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--only", default=",".join(TARGETS), help=f"comma-separated subset of {TARGETS}")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or args.cases < 1:
        parser.error(
            f"unknown target(s) {unknown}; choose from {TARGETS}" if unknown else "--cases must be >= 1"
        )
    budget = _split(args.cases, targets)
    runs: Dict[str, Callable[[], Tuple[int, Any]]] = {
        "dialects": lambda: run_property(dialect_cases(), check_dialect, budget["dialects"], args.seed),
        "memory": fuzz_memory,
        "wire": lambda: run_property(
            st.tuples(upload_bodies(), st.sampled_from([16, 200, WIRE_LIMIT])),
            check_decode,
            budget["wire"],
            args.seed,
        ),
        "http": lambda: fuzz_http(budget["http"], args.seed),
    }
    total, failed = 0, 0
    for target in targets:
        started = time.perf_counter()
        count, failure = runs[target]()
        failures = failure if isinstance(failure, list) else [failure] if failure else []
        total += count
        failed += len(failures)
        seconds = time.perf_counter() - started
        print(f"{target:<9} {count:>7} cases  {len(failures)} failures  {seconds:6.1f} s", flush=True)
        for text in failures:
            print("    " + text.replace("\n", "\n    "), flush=True)
    print(f"total     {total:>7} cases  {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

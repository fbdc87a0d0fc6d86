"""Worker side of the panel: the sliced volume copy and the once-per-answer mask download."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import phantom_ct
from medmllm.io.segnrrd import Segment, write_seg_nrrd
from slicer_fakes.fixtures import fake_slicer  # noqa: F401

URL = "/v1/results/abc/segmentation.seg.nrrd"


@pytest.fixture
def worker(fake_slicer):  # noqa: F811
    from MedMLLMSlicerLib import worker

    return worker


class MaskServer:
    """A client double whose answer has masks in one cumulative `.seg.nrrd` (as the real server)."""

    def __init__(self, tmp_path, events, segments):
        self.events, self.downloads = events, []
        voxels, self.ijk_to_ras = phantom_ct()
        self.file = write_seg_nrrd(tmp_path / "served.seg.nrrd", segments(voxels), self.ijk_to_ras)

    def chat(self, volume_id, **request):
        yield from self.events

    def download(self, url, path):
        self.downloads.append(url)
        if url != URL:
            raise ValueError(f"no file at {url}")
        with open(path, "wb") as out:
            out.write(self.file.read_bytes())
        return path


def _mask(label, segment, url=URL):
    return {"type": "mask", "label": label, "segment": segment, "url": url}


def test_masks_are_downloaded_once_at_done_and_imported_once(worker, tmp_path):
    events = [
        {"type": "token", "text": "Here: "},
        _mask("bone", 0),
        {"type": "token", "text": "and "},
        _mask("body", 1),
        _mask("bone", 0),  # a repeated event must not give a second segment
        {"type": "done", "result_id": "abc"},
    ]
    server = MaskServer(
        tmp_path,
        events,
        lambda v: [Segment("bone", v > 300, (1, 1, 1)), Segment("body", v > -500, (1, 0, 0))],
    )
    out = list(worker.stream_events(server, "0" * 64, {}, str(tmp_path / "dl")))
    assert [e["type"] for e in out] == ["token", "token", "mask", "mask", "done"]
    assert server.downloads == [URL], "one download for the whole answer"
    voxels, _ = phantom_ct()
    bone, body = out[2], out[3]
    assert bone["label"] == "bone" and bone["mask"].dtype == np.uint8
    assert np.array_equal(bone["mask"], voxels > 300) and np.array_equal(body["mask"], voxels > -500)
    assert np.allclose(bone["mask_ijk_to_ras"], server.ijk_to_ras)
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir()), "download removed"


def test_bad_mask_files_become_warnings_not_crashes(worker, tmp_path):
    events = [_mask("bone", 0), _mask("ghost", 5), _mask("far", 0, url="/elsewhere"), {"type": "done"}]
    server = MaskServer(tmp_path, events, lambda v: [Segment("bone", v > 300, (1, 1, 1))])
    (tmp_path / "dl").mkdir()
    out = list(worker.stream_events(server, "0" * 64, {}, str(tmp_path / "dl")))
    kinds = [(e["type"], e.get("label") or e.get("message")) for e in out]
    assert kinds[0] == ("mask", "bone")
    assert ("warning", "mask 'ghost' is missing from the server's file") in kinds
    assert any(k == "warning" and "could not be fetched: no file at /elsewhere" in m for k, m in kinds)
    assert kinds[-1][0] == "done"
    server.file.write_bytes(b"not an nrrd file")
    out = list(worker.stream_events(server, "0" * 64, {}, str(tmp_path / "dl")))
    assert out[0]["type"] == "warning" and "could not be fetched" in out[0]["message"]


def test_volume_snapshot_copies_in_bounded_steps(worker):
    source = np.arange(40 * 16 * 16, dtype=np.int16).reshape(40, 16, 16)
    snapshot = worker.VolumeSnapshot(lambda: source)
    assert snapshot.step(budget_s=0.0) is False and snapshot.done_slices == 1, "one slice per step at least"
    while not snapshot.step():
        pass
    assert np.array_equal(snapshot.voxels, source) and snapshot.voxels is not source


def test_volume_snapshot_stops_when_the_volume_changes(worker):
    arrays = [np.zeros((10, 8, 8), dtype=np.int16)]
    snapshot = worker.VolumeSnapshot(lambda: arrays[0])
    snapshot.step(budget_s=0.0)
    arrays[0] = np.zeros((10, 8, 8), dtype=np.int16)  # Slicer reallocated the image data
    with pytest.raises(ValueError, match="volume changed while it was being read"):
        snapshot.step()
    with pytest.raises(ValueError, match="no 3D scalar voxels"):
        worker.VolumeSnapshot(lambda: np.zeros((4, 4)))


def test_dispatcher_ticks_fast_and_waits_gil_free_while_a_worker_runs(worker, monkeypatch):
    """Where idle Qt holds the GIL (PythonQt in Slicer) a worker advances only while the main thread
    runs Python: with a worker running the timer ticks every FAST_TICK_MS, and a tick hands the GIL
    to the worker while it waits for output, so what the worker posts meanwhile is run in that tick.
    The wait ends as soon as output arrives; it is widened here so that a busy machine's scheduler
    cannot make the worker miss a 3 ms window (the mechanism, not its timing, is under test)."""
    import threading

    monkeypatch.setattr(worker, "WAIT_S", 5.0)
    dispatcher = worker.Dispatcher()
    dispatcher._timer.stop()  # ticks are driven by hand here
    assert dispatcher._timer.interval() == worker.TICK_MS
    go, ran = threading.Event(), []
    dispatcher.start(lambda: go.wait(5) and dispatcher.post(ran.append, "from the worker"), "test")
    assert dispatcher.running == 1 and dispatcher._timer.interval() == worker.FAST_TICK_MS
    go.set()  # the worker now needs the GIL to post; the main thread holds it until drain waits
    dispatcher.drain()
    assert ran == ["from the worker"], "the worker's output arrived within the same tick"
    while dispatcher.running:
        dispatcher.drain()
    assert dispatcher._timer.interval() == worker.TICK_MS
    dispatcher.stop()

"""`builtin`: the engine that needs no model weights and works offline; the default for the demo.

Answers come from real image analysis of the volume (CT anatomy from Hounsfield units, a brain
mask on MRI, measurements, a templated report), routed by keywords; it says plainly that it is
not a language model. Expensive masks are cached per volume id for the last few volumes.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from medmllm.anatomy.catalogue import Part
from medmllm.anatomy.runner import AnatomyUnavailable, RunCancelled, RunFailed
from medmllm.anatomy.tool import AnatomyTool, names_a_structure
from medmllm.engines.base import (
    BoxOut,
    Capabilities,
    ChatContext,
    Engine,
    EngineError,
    EngineEvent,
    EngineOptions,
    MaskOut,
    ModelInfo,
    ReportOut,
    TokenOut,
)
from medmllm.engines.builtin import intents
from medmllm.engines.builtin.ct_tools import CTAnalysis
from medmllm.engines.builtin.measure import Measurement, measure, size_sentence, where_sentence
from medmllm.engines.builtin.mri_tools import BrainMaskError, brain_mask
from medmllm.engines.builtin.report import guess_modality, volume_report
from medmllm.engines.toolkit import stream_words as _words
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.volume import Volume
from medmllm.samples import cache_dir

NOT_AN_LLM = "(Built-in image-analysis tools, not a language model.)"
BRAIN_PLAUSIBLE_ML = 500.0  # adult brains are 1000-1700 mL; far less suggests the wrong kind of image
SMALL_BRAIN = "This is far smaller than an adult brain: check that the volume is a head MRI."
MAX_CACHED_VOLUMES = 2  # masks of a 512x512x300 CT take ~80 MB each; keep the last two volumes

# Slicer GenericAnatomyColors-style display colours (0..1 RGB) per segment name.
COLOURS: Dict[str, Tuple[float, float, float]] = {
    name: (r / 255.0, g / 255.0, b / 255.0)
    for name, (r, g, b) in {
        "Body": (177, 122, 101),
        "Right lung": (230, 160, 120),
        "Left lung": (120, 170, 230),
        "Airway": (182, 228, 255),
        "Bone": (241, 214, 145),
        "Brain": (255, 190, 110),  # brighter than GenericAnatomy's near-white: visible on T1
    }.items()
}
ANATOMY_HELP = (
    " With TotalSegmentator, any of its 117 CT or 50 MR structures by name, e.g. 'how big is the "
    "spleen?', '左肾在哪里', 'where is L1?'; and a box (ROI) gets the structure that fills it."
)
ORGANS_NOTE = (
    "Rows marked (TotalSegmentator) are its segmentation (Wasserthal et al., Radiology: AI 2023), run "
    "on this volume when an organ was asked for."
)
METHOD_NOTES = {
    "CT": "CT tools: body > -500 HU (trunk and arms, not the table; holes filled per slice); lungs "
    "< -400 HU regions with the median HU of lung tissue (bowel gas is purer air), split at the "
    "patient's midline into right and left even where they touch; airway: the midline air tube "
    "(< -900 HU) of the trachea and the main bronchi; bones: >= 150 HU minus homogeneous "
    "contrast-filled vessels, closed and hole-filled so marrow counts. Scored against "
    "TotalSegmentator on real scans in docs/benchmarks.md.",
}


class _VolumeState:
    """What the engine knows about one volume; `lock` serialises the expensive tools."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.modality = guess_modality(volume.voxels)
        self.ct: Optional[CTAnalysis] = None
        if self.modality[0] == "CT":
            self.ct = CTAnalysis(volume.voxels, volume.ijk_to_ras, volume.spacing)
        self.brain: Optional[Tuple[np.ndarray, str]] = None
        self.measurements: Dict[str, Measurement] = {}
        self.lock = threading.Lock()


class BuiltinEngine(Engine):
    """Options: `extra["brain_method"]` = "auto" (default), "deepbet" or "classical"; the
    `anatomy*` options of `medmllm.anatomy.tool` (TotalSegmentator for every named organ)."""

    name = "builtin"

    def __init__(self, options: Optional[EngineOptions] = None) -> None:
        super().__init__(options or EngineOptions())
        self.brain_method = str(self.options.extra.get("brain_method", "auto"))
        if self.brain_method not in ("auto", "deepbet", "classical"):
            raise EngineError(f"brain_method must be auto, deepbet or classical; got {self.brain_method!r}")
        self._states: OrderedDict = OrderedDict()
        self._states_lock = threading.Lock()
        try:
            self.anatomy = AnatomyTool(self.options.extra, cache_dir() / "anatomy")
        except ValueError as exc:
            raise EngineError(str(exc)) from None

    def models(self) -> List[ModelInfo]:
        return [
            ModelInfo(
                engine=self.name,
                model="builtin-anatomy",
                description="Deterministic anatomy tools (CT body/lungs/airway/bone, MRI brain), "
                "measurements and a templated report; keyword routing in English and Chinese. "
                "Not a language model.",
                capabilities=Capabilities(
                    input="volume3d", boxes=True, masks=True, region_input=True, languages=("en", "zh")
                ),
                licence="Apache-2.0 (this project); brain network weights: deepbet, MIT",
                intended_use="Teaching, demos and pipeline checks without a GPU; not for diagnosis.",
            )
        ]

    def use_store(self, folder: Path) -> None:
        self.anatomy.use_store(folder / "anatomy")

    def forget(self, volume_id: str) -> None:
        self.anatomy.runner.cache.forget(volume_id)

    def sweep(self, held: Callable[[str], bool]) -> None:
        self.anatomy.runner.cache.sweep(held)

    def prepare(self, volume: Volume, volume_id: str) -> None:
        self._state(volume, volume_id)

    def close(self) -> None:
        with self._states_lock:
            self._states.clear()

    def chat(self, ctx: ChatContext, cancel: threading.Event) -> Iterator[EngineEvent]:
        request = intents.parse(ctx.question)
        yield from _words(NOT_AN_LLM, cancel)
        if cancel.is_set():
            return
        state = self._state(ctx.volume, ctx.volume_id)
        about_box = ctx.roi is not None and self.anatomy.enabled and not request.structures
        about_box = about_box and request.intent not in ("report", "help")
        if about_box and not self.anatomy.parts(ctx.question, state.modality[0]):
            yield from self._roi(ctx, state, cancel)
            return
        if request.intent not in ("report", "help"):
            parts = self.anatomy.parts(ctx.question, state.modality[0])
            answered = (yield from self._anatomy(ctx, state, request, parts, cancel)) if parts else False
            if answered or cancel.is_set():
                return
            missing = self.anatomy.missing(state.modality[0])
            if not parts and not request.structures and missing and names_a_structure(ctx.question):
                yield from _words(missing, cancel)
                return
        if request.intent == "report":
            yield from self._report(state, ctx.volume_id, cancel)
        elif request.structures:
            yield from self._answer(state, request, cancel)
        elif request.unknown:
            text = f"I cannot find '{request.unknown}' with these tools. {self._capabilities()}"
            yield from _words(text, cancel)
        elif request.intent == "help":
            yield from _words(self._capabilities(), cancel)
        else:
            yield from _words(f"I did not recognise a question I can answer. {self._capabilities()}", cancel)

    def _capabilities(self) -> str:
        extra = ANATOMY_HELP if self.anatomy.enabled and self.anatomy.installed() else ""
        return intents.capabilities_text() + extra

    def _state(self, volume: Volume, volume_id: str) -> _VolumeState:
        with self._states_lock:
            state = self._states.get(volume_id)
            if state is None:
                state = _VolumeState(volume)
                self._states[volume_id] = state
            self._states.move_to_end(volume_id)
            while len(self._states) > MAX_CACHED_VOLUMES:
                self._states.popitem(last=False)
            return state

    def _segments(self, state: _VolumeState, key: str) -> Dict[str, np.ndarray]:
        """{segment name: mask} for a structure key; computed once per volume."""
        with state.lock:
            if key == "brain":
                if state.brain is None:
                    state.brain = brain_mask(state.volume.voxels, state.volume.ijk_to_ras, self.brain_method)
                return {"Brain": state.brain[0]} if state.brain[0].any() else {}
            if state.ct is None:  # callers check the modality first; this keeps a wrong call loud
                raise EngineError(f"the {key} tool needs a CT volume")
            tools: Dict[str, Callable[[], Dict[str, np.ndarray]]] = {
                "body": state.ct.body_masks,
                "lung": state.ct.lung_masks,
                "airway": state.ct.airway_masks,
                "bone": state.ct.bone_masks,
            }
            return tools[key]()

    def _measure(self, state: _VolumeState, label: str, mask: np.ndarray, key: str = "") -> Measurement:
        """Measured once per volume and `key` (default: the label)."""
        key = key or label
        with state.lock:
            if key not in state.measurements:
                state.measurements[key] = measure(label, mask, state.volume.voxels, state.volume.ijk_to_ras)
            return state.measurements[key]

    def _reference(self, state: _VolumeState) -> Optional[Measurement]:
        """Body (CT) or brain (MR) measurement: what left/right/midline is judged against."""
        key, label = ("body", "Body") if state.ct is not None else ("brain", "Brain")
        segments = self._segments(state, key)
        return self._measure(state, label, segments[label]) if label in segments else None

    def _answer(
        self, state: _VolumeState, request: intents.Request, cancel: threading.Event
    ) -> Iterator[EngineEvent]:
        for key in request.structures:
            if cancel.is_set():
                return
            wrong = _modality_mismatch(state, key)
            if wrong:
                yield from _words(wrong, cancel)
                continue
            try:
                found = self._segments(state, key)
            except BrainMaskError as exc:
                yield from _words(str(exc), cancel)
                continue
            segments = _pick_side(found, request.side)
            if not segments:
                yield from _words(_absent_sentence(key, request.side, found), cancel)
                continue
            reference = self._reference(state) if request.intent == "where" else None
            for label, mask in segments.items():
                if cancel.is_set():
                    return
                yield from self._one_segment(state, request.intent, label, mask, reference, cancel)

    def _one_segment(
        self,
        state: _VolumeState,
        intent: str,
        label: str,
        mask: np.ndarray,
        reference: Optional[Measurement],
        cancel: threading.Event,
        part: Optional[Part] = None,
    ) -> Iterator[EngineEvent]:
        """One structure's answer; `part` when it is a TotalSegmentator structure (colour, terminology)."""
        m = self._measure(state, label, mask, f"anatomy:{label}" if part else "")
        unit = "HU" if state.ct is not None else "intensity"
        caution = f" {SMALL_BRAIN}" if _small_brain(m) else ""
        if intent == "where":
            yield BoxOut(
                label, IJKBox.from_voxels(*m.voxel_lo, *m.voxel_hi), {"tool": "builtin", "kind": "bounds"}
            )
            yield from _words(where_sentence(m, reference) + caution, cancel)
            return
        colour = part.color if part else COLOURS.get(label)
        yield MaskOut(label, mask, colour, m.stats(), part.terminology if part else None)
        text = size_sentence(m, unit)
        if intent in ("show", "segment"):
            text = f"Showing the {label.lower()} as a segment. " + text
        yield from _words(text + caution, cancel)

    def _anatomy(
        self,
        ctx: ChatContext,
        state: _VolumeState,
        request: intents.Request,
        parts: List[Part],
        cancel: threading.Event,
    ) -> Iterator[EngineEvent]:
        """Answer with TotalSegmentator's structures; returns False when it could not run (the
        sentence why is said), so the built-in tools may still answer."""
        run = self.anatomy.masks(ctx.volume, ctx.volume_id, state.modality[0], parts, cancel)
        try:
            masks = yield from _notes(run)
        except RunCancelled:
            return True
        except AnatomyUnavailable as exc:
            yield from _words(str(exc), cancel)
            return False
        except RunFailed as exc:
            yield from _words(f"TotalSegmentator failed: {exc}", cancel)
            return False
        intent = request.intent if request.intent in intents.ASKS_ABOUT_A_STRUCTURE else "show"
        reference = self._reference(state) if intent == "where" else None
        for part, mask in masks:
            if cancel.is_set():
                return True
            if not mask.any():
                yield from _words(f"TotalSegmentator found no {part.name.lower()} in this volume.", cancel)
                continue
            yield from self._one_segment(state, intent, part.name, mask, reference, cancel, part)
        return True

    def _roi(self, ctx: ChatContext, state: _VolumeState, cancel: threading.Event) -> Iterator[EngineEvent]:
        """The user's box: TotalSegmentator's structure that fills it best, as a segment."""
        if not self.anatomy.installed():
            yield from _words(f"Telling what a box holds: {self.anatomy.missing(state.modality[0])}", cancel)
            return
        run = self.anatomy.structure_in_box(ctx.volume, ctx.volume_id, state.modality[0], ctx.roi, cancel)
        try:
            found = yield from _notes(run)
        except RunCancelled:
            return
        except (AnatomyUnavailable, RunFailed) as exc:
            yield from _words(str(exc), cancel)
            return
        if found is None:
            yield from _words("No structure TotalSegmentator knows fills this box.", cancel)
            return
        part, mask, iou = found
        yield from _words(f"The box holds the {part.name.lower()} (box overlap {iou:.2f}).", cancel)
        yield from self._one_segment(state, "show", part.name, mask, None, cancel, part)

    def _report(self, state: _VolumeState, volume_id: str, cancel: threading.Event) -> Iterator[EngineEvent]:
        keys = [s.key for s in intents.STRUCTURES if s.modality == state.modality[0]]
        findings: List[Measurement] = []
        notes: List[str] = [METHOD_NOTES[state.modality[0]]] if state.modality[0] in METHOD_NOTES else []
        for key in keys:
            yield from _words(f"Analysing {intents.structure(key).title}...", cancel)
            if cancel.is_set():
                return
            try:
                segments = self._segments(state, key)
            except BrainMaskError as exc:
                notes.append(str(exc))
                continue
            findings += [self._measure(state, label, mask) for label, mask in segments.items()]
        organs = self.anatomy.report_parts(volume_id, state.modality[0])
        for part, mask in organs:
            measured = self._measure(state, part.name, mask, f"anatomy:{part.name}")
            findings.append(dataclasses.replace(measured, label=f"{part.name} (TotalSegmentator)"))
        if organs:
            notes.append(ORGANS_NOTE)
        if state.brain is not None:
            notes.append(f"Brain mask method: {state.brain[1]}.")
        notes += [SMALL_BRAIN for m in findings if _small_brain(m)]
        yield ReportOut(volume_report(state.volume.describe(), state.modality, findings, notes))
        found = ", ".join(f"{m.label.lower()} {m.volume_ml:.0f} mL" for m in findings) or "no structures"
        yield from _words(f"Report ready. Modality guess: {state.modality[0]}. Found: {found}.", cancel)


def _small_brain(m: Measurement) -> bool:
    return m.label == "Brain" and m.volume_ml < BRAIN_PLAUSIBLE_ML


def _modality_mismatch(state: _VolumeState, key: str) -> str:
    needed = intents.structure(key).modality
    if needed == state.modality[0]:
        return ""
    title = intents.structure(key).title
    if needed == "CT":
        return f"Finding the {title} needs CT Hounsfield units; this is not CT ({state.modality[1]})."
    return f"The {title} tool works on brain MRI, and this volume looks like CT ({state.modality[1]})."


def _pick_side(segments: Dict[str, np.ndarray], side: Optional[str]) -> Dict[str, np.ndarray]:
    """The segments of the asked side; all of them when the structure has no sides (airway, bone)."""
    if side is None or not any(k.lower().startswith(("right", "left")) for k in segments):
        return segments
    return {k: v for k, v in segments.items() if k.lower().startswith(side)}


def _absent_sentence(key: str, side: Optional[str], found: Dict[str, np.ndarray]) -> str:
    """Say plainly that the structure is not in this scan (never return something else instead)."""
    title = intents.structure(key).title
    if found and side:
        others = ", ".join(k.lower() for k in found)
        return f"The {side} {title.rstrip('s')} is not in this scan; I found only the {others}."
    return (
        f"The {title} {'are' if title.endswith('s') else 'is'} not in this scan, as far as the built-in "
        "tools can tell."
    )


def _notes(run: Iterator[str]) -> Iterator[TokenOut]:
    """A runner's progress notes as tokens; returns what the runner returns."""
    while True:
        try:
            note = next(run)
        except StopIteration as done:
            return done.value
        yield TokenOut(note)


ENGINE = BuiltinEngine

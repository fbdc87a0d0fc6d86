"""Files that stock 3D Slicer opens: `.seg.nrrd` segmentations, `.mrk.json` ROIs, Markdown reports."""

from medmllm.io.markups import (
    MARKUPS_SCHEMA_URL,
    read_roi_json,
    roi_document,
    safe_filename,
    unique_names,
    validate_markups,
    write_roi_json,
)
from medmllm.io.report import DISCLAIMER, render_report
from medmllm.io.segnrrd import Segment, read_seg_nrrd, write_seg_nrrd

__all__ = [
    "DISCLAIMER",
    "MARKUPS_SCHEMA_URL",
    "Segment",
    "read_roi_json",
    "read_seg_nrrd",
    "render_report",
    "roi_document",
    "safe_filename",
    "unique_names",
    "validate_markups",
    "write_roi_json",
    "write_seg_nrrd",
]

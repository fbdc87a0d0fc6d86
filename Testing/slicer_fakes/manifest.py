"""The Slicer API the fakes accept: `api-manifest.json`, the intersection of the manifests of every
supported Slicer release (5.8.1, 5.10.0, 5.12.3 and main; made by `scripts/slicer_api_manifest.py`,
sources and commits in its `source` field), so a call one release lacks fails in the tests."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = json.loads(Path(__file__).with_name("api-manifest.json").read_text(encoding="utf-8"))
SUPPORTED_RELEASES = tuple(MANIFEST["source"]["releases"])

"""Write the API manifest the fake MRML scene checks against: what every supported Slicer has.

Input: the per-release manifests (`api-manifest.json`, one per Slicer tag, generated from that tag's
headers and Python sources; format in docs/slicer-module.md). Output: their intersection, so a call
that one supported release lacks (e.g. `vtkSegment.SetTerminology`, added in 5.10) fails in the
tests. Overloads are kept only when their argument count exists in every release; `slicer.util`
functions and Python modules keep the oldest release's description (their parameters only grow).

    python scripts/slicer_api_manifest.py OUT.json 5.8.1=a.json 5.10.0=b.json 5.12.3=c.json main=d.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

_SPEC = importlib.util.spec_from_file_location(
    "signatures", Path(__file__).resolve().parents[1] / "Testing" / "slicer_fakes" / "signatures.py"
)
_SIGNATURES = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_SIGNATURES)
signature_arity = _SIGNATURES.signature_arity


def _common_signatures(name: str, per_release: List[List[str]]) -> List[str]:
    """The first release's overloads whose argument range every release also has."""
    arities = [{signature_arity(s, name) for s in sigs} for sigs in per_release]
    return [s for s in per_release[0] if all(signature_arity(s, name) in a for a in arities[1:])]


def _common_class(infos: List[Dict[str, Any]]) -> Dict[str, Any]:
    first = infos[0]
    methods = set.intersection(*(set(i["methods"]) for i in infos))
    signatures = {}
    for name in sorted(methods):
        per_release = [i.get("signatures", {}).get(name, []) for i in infos]
        if all(per_release):
            signatures[name] = _common_signatures(name, per_release)
    constants = {
        k: v for k, v in first.get("constants", {}).items() if all(k in i.get("constants", {}) for i in infos)
    }
    return {
        "superclass": first.get("superclass"),
        "chain": first["chain"],
        "header": first.get("header"),
        "methods": sorted(methods),
        "static_methods": sorted(set.intersection(*(set(i["static_methods"]) for i in infos))),
        "constants": constants,
        "signatures": signatures,
    }


def intersect(manifests: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The API every manifest has (classes, methods, constants, slicer.util functions, modules)."""
    tags = list(manifests)
    all_ = list(manifests.values())
    classes = {
        name: _common_class([m["classes"][name] for m in all_])
        for name in all_[0]["classes"]
        if all(name in m["classes"] for m in all_)
    }
    util = {
        name: sig
        for name, sig in all_[0]["slicer.util"].items()
        if all(name in m["slicer.util"] for m in all_)
    }
    modules = {
        name: mod for name, mod in all_[0]["modules"].items() if all(name in m["modules"] for m in all_)
    }
    return {
        "source": {
            "what": "API common to these Slicer releases (scripts/slicer_api_manifest.py)",
            "releases": {
                tag: {
                    "commit": m["source"]["commit"],
                    "date": str(m["source"]["commit_date"]).splitlines()[-1],
                }
                for tag, m in zip(tags, all_)
            },
        },
        "notes": all_[0]["notes"],
        "classes": classes,
        "slicer.util": util,
        "modules": modules,
    }


def main(argv: List[str]) -> int:
    out, pairs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    manifests = {tag: json.loads(Path(path).read_text(encoding="utf-8")) for tag, path in pairs}
    out.write_text(json.dumps(intersect(manifests), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"{out}: {len(manifests)} releases, API common to {', '.join(manifests)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

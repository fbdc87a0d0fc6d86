"""Model text made safe to print on a terminal (files keep the text exactly as the model wrote it).

A model's answer is untrusted: escape sequences in it could recolour, move the cursor, retitle the
window, hide earlier lines or write OSC 52 to the clipboard, and bidi overrides could make text read
differently from what it is. What reaches the terminal keeps printable text, newlines and tabs only.
"""

from __future__ import annotations

import re
import unicodedata

#: ESC-introduced sequences (CSI ... final byte, OSC/DCS/APC/PM/SOS ... terminator, two-byte escapes)
#: and the 8-bit CSI, removed whole so no parameter bytes are left behind as clutter.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x1b][\]PX^_].*?(?:\x07|\x1b\\|\x9c|$)"
    r"|[\x90\x9d\x98\x9e\x9f].*?(?:\x07|\x1b\\|\x9c|$)"
    r"|\x1b[ -/]*[0-~]?",
    re.DOTALL,
)
#: Bidirectional embeddings, overrides and isolates (the "Trojan Source" characters).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """`text` without terminal control sequences, control characters (but newline and tab) and bidi
    overrides; everything else, every script and emoji included, is kept."""
    text = _ESCAPES.sub("", text)
    return "".join(
        c for c in text if c in "\n\t" or (c not in _BIDI and unicodedata.category(c) not in ("Cc", "Cs"))
    )

"""A conversation as plain data: turns, grounded items, JSON round trip, HTML rendering.

Pure Python (no Qt, no MRML) so the chat history, what is stored in the scene and what the
panel shows are one structure, tested without Slicer.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

FORMAT_VERSION = 1


@dataclass
class Item:
    """A grounded result of an answer: a box (ROI node) or a mask (segment), linkable in the chat."""

    kind: str  # "box" | "mask"
    label: str
    node_id: str = ""
    segment_id: str = ""
    center: Optional[List[float]] = None
    ref: str = ""  # reference role on the conversation node: follows the node through scene import


@dataclass
class Turn:
    role: str  # "user" | "assistant" | "notice"
    text: str = ""
    items: List[Item] = field(default_factory=list)
    report: str = ""
    status: str = ""  # assistant: "" streaming, "done", "stopped", "error"


@dataclass
class Conversation:
    """Everything the scene keeps about one chat; `session_id` is the server's follow-up handle."""

    volume_id: str = ""
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    model: str = ""
    turns: List[Turn] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the stored conversation is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError("the stored conversation has an unknown format")
        turns = [
            Turn(**{**t, "items": [Item(**i) for i in t.get("items", [])]}) for t in data.get("turns", [])
        ]
        return cls(
            data.get("volume_id", ""), data.get("session_id", uuid.uuid4().hex), data.get("model", ""), turns
        )

    def messages(self) -> List[Dict[str, str]]:
        """The history as the server's `messages` list (user and finished assistant turns)."""
        return [
            {"role": t.role, "content": t.text}
            for t in self.turns
            if t.role in ("user", "assistant") and t.text
        ]


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_COLORS = {"user": "#1f4e79", "assistant": "#222222", "notice": "#8a5a00"}
_ICONS = {"box": "▣", "mask": "◆"}
_WHO = {"user": "You", "assistant": "Model", "notice": "Note"}


def format_text(text: str) -> str:
    """Minimal Markdown (bold, code, bullets, headings, line breaks) to safe HTML: model text is untrusted."""
    lines = []
    for raw in html.escape(text).split("\n"):
        line = _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<b>\1</b>", raw))
        if line.startswith("#"):
            line = f"<b>{line.lstrip('#').strip()}</b>"
        elif line.lstrip().startswith(("- ", "* ")):
            line = "&nbsp;&nbsp;&bull; " + line.lstrip()[2:]
        lines.append(line)
    return "<br>".join(lines)


def item_link(turn_index: int, item_index: int) -> str:
    return f"medmllm:item/{turn_index}/{item_index}"


def parse_link(url: str) -> Optional[tuple]:
    """(turn_index, item_index) of a link made by `item_link`, or None for anything else."""
    match = re.fullmatch(r"medmllm:item/(\d+)/(\d+)", url)
    return (int(match.group(1)), int(match.group(2))) if match else None


def render_html(conversation: Conversation) -> str:
    """The whole conversation as HTML for a QTextBrowser; grounded items are clickable links."""
    parts = []
    for t_index, turn in enumerate(conversation.turns):
        body = format_text(turn.text) or ("<i>…</i>" if turn.role == "assistant" and not turn.status else "")
        links = " ".join(
            f'<a href="{item_link(t_index, i)}">{_ICONS[item.kind]} {html.escape(item.label)}</a>'
            for i, item in enumerate(turn.items)
        )
        tail = " <i>(stopped)</i>" if turn.status == "stopped" else ""
        if turn.report:
            tail += f"<br><b>Report</b> (also in the report text node):<br>{format_text(turn.report)}"
        parts.append(
            f'<p style="color:{_COLORS.get(turn.role, "#222")}"><b>{_WHO.get(turn.role, turn.role)}:</b> '
            f"{body}{tail}" + (f"<br>{links}" if links else "") + "</p>"
        )
    return "\n".join(parts)

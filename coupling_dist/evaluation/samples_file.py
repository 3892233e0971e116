"""Reading sample files (JSONL, one object per line with a ``text`` field) for evaluation.

Every bad line is reported with its 1-based line number and a reason, counted, and left out of
the scores: empty lines, bytes that are not UTF-8, invalid JSON, a non-object, a missing or
non-string ``text``, a text longer than ``max_chars``, an ``ids`` field that is not a list of
integers. The caller logs them and records them in results.json; nothing is dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SampleFile:
    path: str
    records: list = field(default_factory=list)  # {"line", "text", "ids" (or None), "index", "settings"}
    problems: list = field(default_factory=list)  # {"line", "reason"}

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.records]

    @property
    def ids(self) -> list[Optional[list[int]]]:
        return [r["ids"] for r in self.records]

    def summary(self, limit: int = 50) -> dict:
        return {"path": self.path, "good": len(self.records), "bad": len(self.problems),
                "bad_lines": self.problems[:limit]}


def _check(obj, max_chars: int) -> Optional[str]:
    if not isinstance(obj, dict):
        return f"not a JSON object (got {type(obj).__name__})"
    if "text" not in obj:
        return "missing field 'text'"
    if not isinstance(obj["text"], str):
        return f"field 'text' is not a string (got {type(obj['text']).__name__})"
    if len(obj["text"]) > max_chars:
        return f"text too long ({len(obj['text'])} chars > evaluate.max_text_chars {max_chars})"
    for key in ("ids", "all_ids"):
        ids = obj.get(key)
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            return f"field '{key}' is not a list of integers"
    return None


def read_samples(path: str, max_chars: int = 10000) -> SampleFile:
    with open(path, "rb") as fh:
        raw = fh.read()
    out = SampleFile(path)
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":  # the newline ending the last line does not start another line
        lines.pop()
    for n, line in enumerate(lines, start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            out.problems.append({"line": n, "reason": "empty line"})
            continue
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.problems.append({"line": n, "reason": f"not valid UTF-8 (byte {e.start}: {line[e.start:e.start + 1]!r})"})
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            out.problems.append({"line": n, "reason": f"invalid JSON: {e.msg} (column {e.colno})"})
            continue
        reason = _check(obj, max_chars)
        if reason:
            out.problems.append({"line": n, "reason": reason})
            continue
        out.records.append({"line": n, "text": obj["text"], "ids": obj.get("ids"), "index": obj.get("index"),
                            "settings": obj.get("settings"), "eos": obj.get("eos"), "all_ids": obj.get("all_ids")})
    return out


def read_reference_file(path: str, max_chars: int = 10000) -> SampleFile:
    """Real text for the reference point: JSONL with 'text' (checked like samples) or plain text,
    one document per line (empty lines are separators there, not errors)."""
    if path.endswith(".jsonl"):
        return read_samples(path, max_chars)
    out = SampleFile(path)
    with open(path, "rb") as fh:
        for n, line in enumerate(fh.read().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                s = line.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                out.problems.append({"line": n, "reason": f"not valid UTF-8 (byte {e.start})"})
                continue
            if len(s) > max_chars:
                out.problems.append({"line": n, "reason": f"text too long ({len(s)} chars > {max_chars})"})
                continue
            out.records.append({"line": n, "text": s, "ids": None, "index": None, "settings": None})
    return out

"""The instruction record every stage passes on, its normalisation and its fingerprint.

A record is the Alpaca-style row ``id, instruction, input, output, source, created_at`` plus ``meta`` for any
extra fields a producer sent. Normalisation (Unicode NFC, collapsed horizontal whitespace, trimmed lines) is the
one definition used by validation, deduplication and training, so the same text always has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ctune_ops.workspace import atomic_write_bytes

RECORD_FIELDS = ("id", "instruction", "input", "output", "source", "created_at")
TEXT_FIELDS = ("instruction", "input", "output")
_FINGERPRINT_SEPARATOR = "\x1f"  # unit separator: cannot occur in normalised text, so fields never run together
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, horizontal whitespace collapsed to one space, lines trimmed, runs of blank lines cut to one."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def fingerprint(instruction: str, input_text: str, output: str) -> str:
    """sha256 of the normalised instruction, input and output: equal content, equal fingerprint."""
    joined = _FINGERPRINT_SEPARATOR.join(normalize_text(t) for t in (instruction, input_text, output))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def dumps_record(record: dict[str, Any]) -> str:
    """One JSON line; keys in a stable order so reruns produce the same bytes."""
    ordered = {key: record[key] for key in RECORD_FIELDS if key in record}
    ordered.update({key: value for key, value in sorted(record.items()) if key not in ordered})
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSON Lines; returns how many were written."""
    lines = [dumps_record(r) for r in records]
    atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return len(lines)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON Lines file that ctune itself wrote (trusted: raises on a bad line, naming it)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None

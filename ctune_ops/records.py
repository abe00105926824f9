"""The instruction record every stage passes on, its normalisation and its fingerprint.

A record is the Alpaca-style row ``id, instruction, input, output, source, created_at`` plus ``meta`` for any
extra fields a producer sent. Normalisation (Unicode NFC, collapsed horizontal whitespace, trimmed lines) is the
one definition used by validation, deduplication and training, so the same text always has the same fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ctune_ops.workspace import atomic_write_bytes

RECORD_FIELDS = ("id", "instruction", "input", "output", "source", "created_at")
TEXT_FIELDS = ("instruction", "input", "output")
_FINGERPRINT_SEPARATOR = "\x1f"  # unit separator: cannot occur in normalised text, so fields never run together
_BLANK_LINES = re.compile(r"\n{3,}")
_RECORD_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # one encoder, not one per row
# normalize_text leaves a string unchanged when it is printable ASCII and single newlines, with no run of spaces,
# no space beside a newline, no run of three newlines and nothing to trim. This RE2 expression (pyarrow) flags
# every other string; only flagged strings go through normalize_text, so the batch path gives the same text.
_MAY_CHANGE = r"[^\x20-\x7e\n]|  | \n|\n |\n\n\n|^[ \n]|[ \n]$"


def _already_normal(text: str) -> bool:
    """Whether normalize_text would return ``text`` unchanged: the complement of _MAY_CHANGE, tested with str
    methods (each one C-level scan, several times cheaper than normalising a short string)."""
    return (text.isascii() and (text.isprintable() or text.replace("\n", "").isprintable())
            and "  " not in text and " \n" not in text and "\n " not in text and "\n\n\n" not in text
            and not text.startswith((" ", "\n")) and not text.endswith((" ", "\n")))


def normalize_text(text: str) -> str:
    """NFC, horizontal whitespace collapsed to one space, lines trimmed, runs of blank lines cut to one."""
    if _already_normal(text):
        return text
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    # str.split() splits on runs of exactly the characters Python's \s matches: each line's whitespace runs
    # become one space and its ends are trimmed, as re.sub(r"[^\S\n]+", " ", line).strip() would, faster.
    text = "\n".join([" ".join(line.split()) for line in text.split("\n")])
    return (_BLANK_LINES.sub("\n\n", text) if "\n\n\n" in text else text).strip()


def normalize_column(values: Sequence[str | None]) -> tuple[list[str | None], Any]:
    """:func:`normalize_text` of every string (None stays None), as a list and as a pyarrow ``large_string`` array.

    A day can hold 100,000 rows; running the per-string normaliser on each costs more than reading the file.
    One vectorised scan finds the strings that normalisation could change, and only those are normalised.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    out = list(values)
    array = pa.array(out, pa.large_string())
    flags = pc.fill_null(pc.match_substring_regex(array, _MAY_CHANGE), False)
    changed = pc.indices_nonzero(flags).to_pylist()
    if changed:
        for index in changed:
            out[index] = normalize_text(out[index])
        array = pc.replace_with_mask(array, flags, pa.array([out[i] for i in changed], pa.large_string()))
    return out, array


def normalize_many(values: Sequence[str | None]) -> list[str | None]:
    """:func:`normalize_text` of every string (None stays None), fast on large batches."""
    return normalize_column(values)[0]


def fingerprint(instruction: str, input_text: str, output: str) -> str:
    """sha256 of the normalised instruction, input and output: equal content, equal fingerprint."""
    # three direct calls, no generator: dedup's hot path, where normalize_text returns the (already normal) text
    fields = (normalize_text(instruction), normalize_text(input_text), normalize_text(output))
    return hashlib.sha256(_FINGERPRINT_SEPARATOR.join(fields).encode("utf-8")).hexdigest()


def _key_order(keys: Iterable[str]) -> list[str]:
    """Record fields in their fixed order, then every other key sorted."""
    keys = list(keys)
    first = [key for key in RECORD_FIELDS if key in keys]
    return first + sorted(key for key in keys if key not in first)


def dumps_record(record: dict[str, Any]) -> str:
    """One JSON line; keys in a stable order so reruns produce the same bytes."""
    ordered = {key: record[key] for key in _key_order(record)}
    return _RECORD_ENCODER.encode(ordered)


def holds_float(value: Any) -> bool:
    """Whether a float is anywhere in ``value`` (msgspec and json write floats differently)."""
    kind = type(value)
    if kind is float:
        return True
    if kind is dict:
        value = value.values()
    elif kind is not list and kind is not tuple:
        return False
    for item in value:  # scalars tested here, not by a call each: a record is mostly strings
        kind = type(item)
        if kind is float or ((kind is dict or kind is list or kind is tuple) and holds_float(item)):
            return True
    return False


@functools.cache
def _encode_lines() -> Any:
    import msgspec

    return msgspec.json.Encoder().encode_lines


def encode_jsonl(records: Sequence[dict[str, Any]], float_rows: Collection[int] | None = None) -> bytes:
    """The bytes of a JSON Lines file of ``records``: each line :func:`dumps_record`'s, byte for byte.

    msgspec's C encoder writes a day of rows about ten times faster than ``json``, and writes strings, integers,
    booleans, null and containers exactly as ``json.dumps(..., ensure_ascii=False)`` does (every code point
    checked) -- but floats in its own notation (``1e16``, not ``1e+16``), so records holding a float go through
    :func:`dumps_record`. ``float_rows``: the positions of the records that may hold one, when the caller knows
    (say, only rows with extra fields can); None looks at every record.
    """
    encode_lines = _encode_lines()
    orders: dict[tuple[str, ...], list[str] | None] = {}
    ordered = []
    for record in records:
        shape = tuple(record)
        if shape not in orders:
            order = _key_order(shape)
            orders[shape] = None if order == list(shape) else order
        order = orders[shape]
        ordered.append(record if order is None else {key: record[key] for key in order})
    suspects = range(len(ordered)) if float_rows is None else sorted(float_rows)
    floats = [index for index in suspects if holds_float(ordered[index])]
    parts, start = [], 0
    for index in floats:
        parts += [encode_lines(ordered[start:index]), dumps_record(ordered[index]).encode("utf-8"), b"\n"]
        start = index + 1
    parts.append(encode_lines(ordered[start:]))
    return b"".join(parts)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSON Lines; returns how many were written."""
    records = list(records)
    atomic_write_bytes(path, encode_jsonl(records))
    return len(records)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON Lines file that ctune itself wrote (trusted: raises on a bad line, naming it)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None

"""Robust reading of a day's raw files: every input unit comes out with its file and line, good or bad.

Upstream producers send JSON Lines (plain or gzip) and Parquet, and they send them broken: byte-order marks,
CRLF line ends, NUL padding after a crash, invalid UTF-8, a last line cut off mid-upload, a JSON array where
JSON Lines were promised. The reader never raises on content. It yields *units* -- a line, a Parquet row, or a
whole file that cannot be read as lines -- each with a 1-based line number, so that the validate stage can put
every unit in exactly one place (accepted or quarantined) and prove it with ``accepted + quarantined = raw``.

Rules (tested in tests/test_validate_ingest.py):

* Files are read in byte order of their names; names starting with ``.`` (editor and transfer debris) are
  skipped and reported. Lines split on ``\\n``; a trailing ``\\r`` (CRLF) and a UTF-8 BOM at the start of a
  file are line-end and file artefacts, not content, and are removed. Whitespace-only lines carry no data and are
  counted (``blank_lines``), not treated as rows.
* A file that is one JSON value spread over several lines (a JSON array of records, a pretty-printed object) is
  one bad unit with reason ``not_json_lines``: its elements have no line numbers of their own, and guessing
  would hide a producer bug. The producer re-sends it as JSON Lines.
* Each Parquet row is a unit; its line number is its row number. Nulls (and NaN in float columns) mean "absent"
  (Parquet cannot tell them apart), dates become ISO strings, and the row is re-encoded as one JSON object, so
  everything after the reader handles one format.
* Unsupported files, unreadable Parquet and gzip streams that end early become one bad unit each, numbered
  after the last good line; the file itself stays untouched in ``incoming/``.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import functools
import gzip
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")
GZIP_SUFFIX = ".gz"
PARQUET_SUFFIX = ".parquet"
GZIP_CHUNK_BYTES = 1 << 20  # decompressed bytes read at a time, so a damaged stream keeps what came before
PARQUET_BATCH_ROWS = 4096  # rows decoded at a time: bounded memory on big files, few Python round trips
_JSON_VALUE_START = (b"[", b"{")


class DayFolderMissing(FileNotFoundError):
    """The day's ``incoming/`` folder does not exist; the message names it."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a unit cannot become a record: a reason code, a message for humans, and the raw bytes if any."""

    reason: str
    message: str
    raw: bytes | None = None


@dataclass
class FileStats:
    """What the reader saw in one file, for the validation report."""

    name: str
    format: str
    units: int = 0
    lines: int = 0
    blank_lines: int = 0
    bom: bool = False
    crlf_lines: int = 0
    unterminated_last_line: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "format": self.format, "units": self.units, "lines": self.lines,
            "blank_lines": self.blank_lines,
            "bom": self.bom, "crlf_lines": self.crlf_lines, "unterminated_last_line": self.unterminated_last_line,
            "notes": self.notes,
        }


def file_format(name: str) -> str | None:
    """``jsonl``, ``jsonl.gz`` or ``parquet`` by file name; None for anything else."""
    lower = name.lower()
    if lower.endswith(PARQUET_SUFFIX):
        return "parquet"
    if lower.endswith(GZIP_SUFFIX):
        return "jsonl.gz" if lower[: -len(GZIP_SUFFIX)].endswith(JSON_LINES_SUFFIXES) else None
    return "jsonl" if lower.endswith(JSON_LINES_SUFFIXES) else None


def day_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The day's entries in name order, and the names skipped as hidden; fails naming a missing folder."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DayFolderMissing(f"day folder {folder} {what}; nothing to validate for this date")
    entries = sorted(folder.iterdir(), key=lambda p: p.name.encode("utf-8", "surrogateescape"))
    hidden = [p.name for p in entries if p.name.startswith(".")]
    return [p for p in entries if not p.name.startswith(".")], hidden


def iter_units(path: Path, stats: FileStats) -> Iterator[tuple[int, bytes | Problem]]:
    """``(line, raw bytes)`` for every unit of a file, or ``(line, Problem)`` where the unit is unreadable."""
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        yield 1, Problem("unsupported_file", f"{path.name} is {kind}; a day folder holds data files only")
        stats.units += 1
        return
    fmt = stats.format
    if fmt == "parquet":
        yield from _parquet_units(path, stats)
    elif fmt in ("jsonl", "jsonl.gz"):
        yield from _json_lines_units(path, stats, gzipped=fmt == "jsonl.gz")
    else:
        size = path.stat().st_size
        stats.units += 1
        yield 1, Problem(
            "unsupported_file",
            f"{path.name} ({size} bytes) is not JSON Lines (.jsonl, .ndjson, .json, optionally .gz) or Parquet; "
            "it stays unchanged in the day folder",
        )


def _read_bytes(path: Path, gzipped: bool) -> tuple[bytes, Exception | None]:
    """The file's bytes (decompressed), and the error that cut a damaged gzip stream short, if any."""
    if not gzipped:
        try:
            return path.read_bytes(), None
        except OSError as exc:  # unreadable (permissions, I/O error): one bad unit, the batch goes on
            return b"", exc
    chunks: list[bytes] = []
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(GZIP_CHUNK_BYTES):
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        return b"".join(chunks), exc
    return b"".join(chunks), None


def _json_lines_units(path: Path, stats: FileStats, gzipped: bool) -> Iterator[tuple[int, bytes | Problem]]:
    """Lines of a JSON Lines file. The whole file is read at once: the day's rows are held in memory anyway,
    and splitting in C is much cheaper than a Python-level line iterator."""
    data, error = _read_bytes(path, gzipped)
    if data.startswith(BOM):
        stats.bom = True
        data = data[len(BOM):]
    lines = data.split(b"\n")
    if lines[-1]:
        stats.unterminated_last_line = True
    else:
        lines.pop()  # the file ends with a newline: no line after it
    stats.lines = len(lines)
    whole = _whole_file_value(path, lines[0], data) if lines and error is None else None
    if whole is not None:
        stats.units += 1
        yield 1, whole
        return
    for number, line in enumerate(lines, start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
            stats.crlf_lines += 1
        if not line or line.isspace():
            stats.blank_lines += 1
            continue
        stats.units += 1
        yield number, line
    if error is not None:
        stats.units += 1
        what = "the gzip stream ends early or is damaged" if gzipped else "the file cannot be read"
        stats.notes.append(f"{what} after line {len(lines)}: {error}")
        yield len(lines) + 1, Problem("corrupt_file", f"{path.name}: {what} after line {len(lines)}: {error}")


def _whole_file_value(path: Path, first_line: bytes, data: bytes) -> Problem | None:
    """A Problem if the file is one multi-line JSON value (array file, pretty-printed object), else None.

    Only files whose first line starts a JSON value but does not parse on its own are parsed whole: a JSON Lines
    file whose first line is a valid JSON array stays a JSON Lines file with one bad (non-object) line.
    """
    head = first_line.strip()
    if not head.startswith(_JSON_VALUE_START):
        return None
    try:
        json.loads(head)
        return None
    except (ValueError, RecursionError):
        pass
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if isinstance(value, list):
        what = f"one JSON array of {len(value)} item(s) over {lines} lines"
    else:
        what = f"one JSON {type(value).__name__} over {lines} lines"
    return Problem(
        "not_json_lines",
        f"{path.name} is {what}, not JSON Lines; re-send it with one JSON object per line",
        data,
    )


def _parquet_units(path: Path, stats: FileStats) -> Iterator[tuple[int, bytes | Problem]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                stats.units += 1
                present = {key: value for key, value in row.items() if not _missing(value)}
                yield number, json.dumps(present, ensure_ascii=False, default=_jsonable).encode("utf-8")
    except (OSError, pa.ArrowException, ValueError) as exc:
        stats.units += 1
        stats.notes.append(f"reading stopped after row {number}: {exc}")
        yield number + 1, Problem("corrupt_file", f"{path.name}: not readable as Parquet after row {number}: {exc}")


def _missing(value: Any) -> bool:
    """Parquet's missing values: null, and NaN in float columns (how pandas writes a missing number)."""
    return value is None or (type(value) is float and math.isnan(value))


def _jsonable(value: Any) -> Any:
    """Parquet values JSON lacks: dates and times as ISO text, decimals as text, bytes as base64 text."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"a Parquet value of type {type(value).__name__} has no JSON form")


class _RejectConstant(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _RejectConstant(f"{name} is not JSON (JavaScript constants are not allowed)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@functools.cache
def _fast_decoder() -> Any:
    import msgspec

    return msgspec.json.Decoder()


@functools.cache
def record_decoder() -> Any:
    """A msgspec decoder of one well-formed record line straight into a typed row (fields str or null).

    It raises on anything else -- other fields, other types, invalid JSON -- and the caller then takes
    :func:`decode_unit`'s path, which accepts extra fields into ``meta`` or explains the problem. Most lines of a
    day are well formed, so most never build a dict.
    """
    import msgspec

    fields = [(name, str | None, None) for name in ("id", "instruction", "input", "output", "source", "created_at")]
    row_type = msgspec.defstruct("RecordRow", fields, forbid_unknown_fields=True, array_like=False)
    return msgspec.json.Decoder(row_type).decode


def decode_unit(data: bytes) -> Any | Problem:
    """The JSON value of one raw line, or the Problem that stops it: NUL bytes, invalid UTF-8, invalid JSON.

    Decoding is strict UTF-8 (never guessed, never replaced) because a replaced byte is silent data loss. JSON
    whose ``\\u`` escapes encode lone surrogates, and numbers beyond a float's range, are rejected too: they
    parse, but cannot be written back as UTF-8 JSON.

    msgspec decodes every valid line (five times faster than ``json``, same values: exact big integers, the last
    of duplicate keys); whatever it rejects goes through ``json`` to be accepted or explained the standard way.
    """
    if b"\x00" in data:
        return Problem("nul_bytes", f"the line holds {data.count(0)} NUL byte(s) (file padding or corruption)", data)
    try:
        return _fast_decoder().decode(data)
    except (ValueError, RecursionError):  # msgspec.DecodeError: rare, so the standard library's verdict is affordable
        pass
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem("invalid_utf8", f"not UTF-8 at byte {exc.start} (0x{data[exc.start]:02x}): {exc.reason}", data)
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return Problem("invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}", data)
    except _RejectConstant as exc:
        return Problem("invalid_json", f"not valid JSON: {exc}", data)
    except RecursionError:
        return Problem("invalid_json", "not valid JSON: nested too deeply", data)
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return Problem("invalid_unicode", "a \\u escape encodes a lone surrogate, which is not a character", data)
    except ValueError:
        return Problem("invalid_json", "a number is beyond the range of a double (JSON cannot write it back)", data)
    return value


def raw_fields(raw: bytes | None) -> dict[str, Any]:
    """The raw bytes of a quarantined unit as JSON: ``raw`` text when it is UTF-8, else ``raw_base64``."""
    if raw is None:
        return {}
    try:
        return {"raw": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw_base64": base64.b64encode(raw).decode("ascii")}

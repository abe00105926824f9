"""A day's raw units read into columns: the rows that parse, where each came from, and those that cannot.

The validate stage's first step (DESIGN §3.1). Every unit the reader yields (:mod:`ctune_ops.ingest`) is counted in
``Day.units`` and ends either as a row of the columns or as a quarantine entry with its raw text, so that the stage
can later prove ``accepted + quarantined = raw`` unit by unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctune_ops.ingest import (
    FileStats,
    Problem,
    day_files,
    decode_unit,
    file_format,
    iter_units,
    raw_fields,
    record_decoder,
)
from ctune_ops.records import RECORD_FIELDS

_KNOWN_KEYS = frozenset((*RECORD_FIELDS, "meta"))
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


@dataclass
class Day:
    """The day as read: columns of the rows that parsed, their provenance, and units quarantined while reading."""

    file_order: dict[str, int] = field(default_factory=dict)
    units: list[tuple[str, int]] = field(default_factory=list)
    stats: list[FileStats] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)
    columns: dict[str, list[str | None]] = field(default_factory=lambda: {f: [] for f in RECORD_FIELDS})
    metas: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)

    def quarantine(self, file: str, line: int, problem: Problem, **extra: Any) -> None:
        self.quarantined.append({
            "file": file, "line": line, "reason": problem.reason, "message": problem.message,
            "check": None, "expectation": None, "column": None, "failed": [problem.reason],
            **extra, **raw_fields(problem.raw),
        })


def take_row(day: Day, value: Any) -> Problem | None:
    """Append a parsed JSON value to the day's columns, or say why it cannot be a record.

    Record fields must be strings (null counts as absent). Unknown fields are kept in ``meta``: an object ``meta``
    the producer sent is kept and the unknown fields are added to it (a field wins over a meta key of its name).
    """
    if type(value) is not dict:
        return Problem("not_object", f"expected a JSON object, got {json_type(value)}")
    row = []
    for name in RECORD_FIELDS:
        item = value.get(name)
        if item is not None and type(item) is not str:
            return Problem("wrong_type", f"field {name!r}: expected a string, got {json_type(item)}")
        row.append(item)
    meta = value.get("meta")
    if meta is not None and type(meta) is not dict:
        return Problem("wrong_type", f"field 'meta': expected an object, got {json_type(meta)}")
    extra = value.keys() - _KNOWN_KEYS
    if extra:  # unknown fields are kept, under meta, never dropped
        meta = {**(meta or {}), **{key: value[key] for key in sorted(extra)}}
    for name, item in zip(RECORD_FIELDS, row, strict=True):
        day.columns[name].append(item)
    day.metas.append(meta or {})
    return None


def read_file(day: Day, path: Path, stats: FileStats) -> None:
    """Every unit of one file into the day: well-formed lines through the typed fast path, the rest explained."""
    name = path.name
    fast_decode = record_decoder()
    ids, instructions, inputs, outputs, sources, created = (day.columns[f] for f in RECORD_FIELDS)
    for number, unit in iter_units(path, stats):
        day.units.append((name, number))
        if type(unit) is Problem:
            day.quarantine(name, number, unit)
            continue
        try:
            row = fast_decode(unit)
        except (ValueError, RecursionError):  # anything unusual: decode_unit accepts it or says why not
            row = None
        if row is not None:  # unrolled: this runs once per row of the day
            ids.append(row.id)
            instructions.append(row.instruction)
            inputs.append(row.input)
            outputs.append(row.output)
            sources.append(row.source)
            created.append(row.created_at)
            day.metas.append({})
        else:
            value = decode_unit(unit)
            if type(value) is Problem:
                if value.reason == "invalid_json" and stats.unterminated_last_line and number == stats.lines:
                    value = Problem(value.reason, f"{value.message} (the last line has no newline: the file "
                                    "looks cut off)", value.raw)
                day.quarantine(name, number, value)
                continue
            problem = take_row(day, value)
            if problem is not None:
                ident = value.get("id") if type(value) is dict and type(value.get("id")) is str else None
                day.quarantine(name, number, Problem(problem.reason, problem.message, unit),
                               **({"id": ident} if ident is not None else {}))
                continue
        day.files.append(name)
        day.lines.append(number)
        day.raws.append(unit)


def read_day(folder: Path) -> Day:
    """Every file of the day folder, in name order; fails (ingest.DayFolderMissing) naming a missing folder."""
    day = Day()
    paths, day.hidden = day_files(folder)
    for index, path in enumerate(paths):
        day.file_order[path.name] = index
        stats = FileStats(path.name, file_format(path.name) or "unsupported")
        day.stats.append(stats)
        read_file(day, path, stats)
    return day

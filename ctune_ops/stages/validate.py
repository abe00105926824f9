"""The validate stage (DESIGN §3.1): every raw unit of ``incoming/D/`` ends accepted or quarantined, with a reason.

1. Read each file unit by unit (:mod:`ctune_ops.validation.day`, :mod:`ctune_ops.ingest`). A unit that is not
   UTF-8, not JSON, not an object or has a field of the wrong type is quarantined at once with its raw text; it
   never stops the batch. Unknown extra fields are kept in ``meta``.
2. Build the day's columns (:mod:`ctune_ops.validation.columns`): text normalised (NFC, whitespace), PHI masked
   when ``validate.phi`` is ``redact``, token counts where a count can decide something.
3. Run the Great Expectations suite (:mod:`ctune_ops.validation.suite`) over the day's frame and quarantine every
   row an expectation rejects, with that expectation's reason; a row failing several gets the first in suite
   order and lists all of them.
4. Prove ``accepted + quarantined = raw`` unit by unit (file and line) -- a violation raises before anything is
   written -- then write ``data/accepted/D.jsonl``, ``data/quarantine/D.jsonl`` and ``reports/D/validation.json``
   atomically. Outputs hold nothing that varies between runs (no clock, no absolute paths), so a rerun of a day
   gives the same bytes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ctune_ops.config import CtuneConfig
from ctune_ops.ingest import DayFolderMissing
from ctune_ops.ingest import raw_fields as raw_json
from ctune_ops.records import RECORD_FIELDS, encode_jsonl
from ctune_ops.stages import StageError, StageResult
from ctune_ops.validation.columns import Columns, build_columns
from ctune_ops.validation.day import Day, read_day
from ctune_ops.validation.phi import PatternError, PhiScreen
from ctune_ops.validation.suite import CONTROL_CHARS, TOKENS_COLUMN, CheckSpec, plan_checks
from ctune_ops.validation.tokens import TokenCounter, TokenizerMissing, load_token_counter
from ctune_ops.workspace import Workspace, atomic_write_bytes, atomic_write_text

STAGE = "validate"
REPORT_FILE = "validation.json"
OUTPUT_WRITERS = 3  # accepted, quarantine, report
_CONTROL = re.compile(CONTROL_CHARS)
log = logging.getLogger(__name__)


class InvariantViolation(RuntimeError):
    """accepted + quarantined != raw: a bug in ctune, never a property of the input. Nothing is written."""


# -- decisions -----------------------------------------------------------------------------------------------
def _failures(unexpected: dict[str, list[int]], specs: list[CheckSpec],
              ids: list[Any]) -> tuple[dict[int, list[str]], dict[Any, int]]:
    """Row -> keys of the checks it failed, in suite (priority) order; and the row that keeps each repeated id.

    GX finds every row of a repeated id unexpected; the first (in file and line order) keeps it.
    """
    failed: dict[int, list[str]] = {}
    first: dict[Any, int] = {}
    for spec in specs:
        rows = unexpected.get(spec.key, [])
        if spec.reason == "duplicate_id":
            for row in sorted(rows):
                first.setdefault(ids[row], row)
            rows = [row for row in rows if first[ids[row]] != row]
        for row in rows:
            failed.setdefault(row, []).append(spec.key)
    return failed, first


def _message(spec: CheckSpec, row: int, values: dict[str, list[Any]], day: Day, phi: PhiScreen,
             first_of: dict[Any, int]) -> tuple[str, str]:
    """(reason, message) of a row rejected by ``spec``."""
    column = spec.column
    if spec.reason == "missing_field":
        return spec.reason, f"required field {column!r} is missing or null"
    if spec.reason == "blank_field":
        return spec.reason, f"required field {column!r} is blank (empty or whitespace only)"
    if spec.reason == "control_chars":
        found = sorted({f"U+{ord(c):04X}" for c in _CONTROL.findall(values[column][row])})
        return spec.reason, f"{column!r} holds control character(s) {', '.join(found)}"
    if spec.reason == "phi":
        field_name = spec.key.split(":", 1)[1]
        names = phi.names(values[field_name][row])
        if not names:  # cannot happen while pandas keeps Python's meaning; kept so a row never loses its reason
            return "phi", f"{field_name!r} matches validate.phi_patterns as a whole but no single pattern"
        return f"phi_{names[0]}", f"{field_name!r} matches PHI pattern(s) {', '.join(names)} (validate.phi_patterns)"
    if spec.reason == "length_chars":
        n = len(values[column][row])
        return spec.reason, (f"{column!r} has {n} characters; allowed "
                             f"{spec.kwargs['min_value']}..{spec.kwargs['max_value']}")
    if spec.reason == "length_tokens":
        n = int(values[TOKENS_COLUMN][row])
        return spec.reason, (f"prompt and response are {n} tokens of models.base; allowed "
                             f"{spec.kwargs['min_value']}..{spec.kwargs['max_value']}")
    if spec.reason == "duplicate_id":
        first = first_of[values["id"][row]]
        return spec.reason, (f"id {values['id'][row]!r} is already used at {day.files[first]}:{day.lines[first]}; "
                             "the first occurrence is kept")
    raise AssertionError(f"no message for check {spec.key}")


def _decide(day: Day, cols: Columns, specs: list[CheckSpec], unexpected: dict[str, list[int]],
            phi: PhiScreen) -> tuple[list[int], list[dict[str, Any]]]:
    """The accepted rows (frame positions) and every quarantine entry, in file and line order."""
    values = cols.values
    failed, first_of = _failures(unexpected, specs, values["id"])
    by_key = {spec.key: spec for spec in specs}
    quarantined = list(day.quarantined)
    for row in sorted(failed):
        spec = by_key[failed[row][0]]
        reason, message = _message(spec, row, values, day, phi, first_of)
        entry = {"file": day.files[row], "line": day.lines[row], "reason": reason, "message": message,
                 "check": spec.key, "expectation": spec.expectation_type, "column": spec.column,
                 "failed": failed[row], **raw_json(day.raws[row])}
        if values["id"][row] is not None:
            entry["id"] = values["id"][row]
        quarantined.append(entry)
    quarantined.sort(key=lambda q: (day.file_order[q["file"]], q["line"]))
    accepted = [row for row in range(len(day.lines)) if row not in failed]
    return accepted, quarantined


def _accepted_records(day: Day, cols: Columns, accepted: list[int], redact: bool, date: str) -> list[dict[str, Any]]:
    """The accepted rows as records, keys in records.dumps_record's order."""
    values = cols.values
    ids, instructions, inputs, outputs, sources, created = (values[name] for name in RECORD_FIELDS)
    records = []
    for row in accepted:
        file, line = day.files[row], day.lines[row]
        record = {
            # id not required and absent: one derived from where the row came from
            "id": ids[row] if ids[row] is not None else f"{date}:{file}:{line}",
            "instruction": instructions[row], "input": inputs[row], "output": outputs[row],
            "source": sources[row], "created_at": created[row],
            "meta": day.metas[row], "provenance": {"file": file, "line": line},
        }
        if redact:  # in redact mode every accepted row says what was masked ({} when nothing was)
            record["redactions"] = cols.redactions.get(row, {})
        records.append(record)
    return records


def _check_invariant(day: Day, accepted: list[int], quarantined: list[dict[str, Any]]) -> None:
    placed = [(day.files[row], day.lines[row]) for row in accepted]
    placed += [(q["file"], q["line"]) for q in quarantined]
    # units are unique (file, line) pairs, so equal sizes and equal sets mean each unit is placed exactly once
    if len(placed) != len(day.units) or set(placed) != set(day.units):
        lost = sorted(set(day.units) - set(placed))[:5]
        extra = sorted((Counter(placed) - Counter(day.units)).elements())[:5]
        raise InvariantViolation(
            f"validate broke accepted + quarantined = raw: accepted {len(accepted)} + quarantined "
            f"{len(quarantined)} != raw {len(day.units)} (units lost: {lost}; placed twice or unknown: {extra}); "
            "no output was written"
        )


# -- the stage -----------------------------------------------------------------------------------------------
def _token_counter(ws: Workspace) -> TokenCounter | None:
    config = ws.config
    if not config.validate.token_bounds:
        return None
    spec = config.models.base
    location = ws.model_path(spec)
    local = Path(spec).is_absolute() or (ws.root / spec).parent.exists()
    try:
        return load_token_counter(location, spec, local)
    except TokenizerMissing as exc:
        raise StageError(str(exc)) from None


def _report(date: str, day: Day, accepted: list, quarantined: list, cols: Columns | None,
            gx_summary: dict[str, Any], config: CtuneConfig) -> dict[str, Any]:
    reasons = Counter(q["reason"] for q in quarantined)
    redactions: Counter[str] = Counter()
    for counts in (cols.redactions.values() if cols else []):
        redactions.update(counts)
    warnings = []
    if not day.units:
        warnings.append(f"incoming/{date} holds no data: nothing was validated")
    return {
        "stage": STAGE,
        "date": date,
        "raw": len(day.units),
        "accepted": len(accepted),
        "quarantined": len(quarantined),
        "invariant": "accepted + quarantined = raw (checked unit by unit: file and line)",
        "reasons": dict(sorted(reasons.items())),
        "files": [s.to_json() for s in day.stats],
        "hidden_files_skipped": day.hidden,
        "warnings": warnings,
        "redacted_rows": len(cols.redactions) if cols else 0,
        "redactions": dict(sorted(redactions.items())),
        "tokens": cols.tokens if cols else {},
        "great_expectations": gx_summary,
        "config": config.validate.model_dump(mode="json"),
    }


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the stage.

    A day is held in lists of a hundred thousand entries; every full collection walks them all (0.4 s of a 2.2 s
    run at 100,000 rows), and the stage creates no reference cycles that need collecting before it ends.
    Reference counting still frees everything as usual; the collector is back on when the stage returns.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run(ws: Workspace, date: str) -> StageResult:
    """Validate ``incoming/<date>/`` into accepted and quarantined rows and a report; see the module docstring."""
    with _collector_paused():
        return _run(ws, date)


def _run(ws: Workspace, date: str) -> StageResult:
    config = ws.config
    phi = PhiScreen.from_config(config.validate)
    try:
        phi.check_engine()
    except PatternError as exc:
        raise StageError(str(exc)) from None
    started = time.perf_counter()
    try:
        day = read_day(ws.incoming(date))
    except DayFolderMissing as exc:
        raise StageError(str(exc)) from None
    log.info("validate %s: read %d units (%d parsed) in %.2fs", date, len(day.units), len(day.lines),
             time.perf_counter() - started)
    counter = _token_counter(ws)
    specs = plan_checks(config.validate, phi.combined, counter is not None)
    cols, gx_summary, unexpected = None, {"skipped": "no row parsed, nothing to validate"}, {}
    if day.lines:
        from ctune_ops.validation.suite import run_suite

        cols = build_columns(day, config, phi, counter)
        suite_run = run_suite(cols.frame, specs)
        unexpected, gx_summary = suite_run.unexpected, suite_run.summary
    log.info("validate %s: columns and expectations done at %.2fs", date, time.perf_counter() - started)
    accepted, quarantined = _decide(day, cols, specs, unexpected, phi) if cols else ([], day.quarantined)
    _check_invariant(day, accepted, quarantined)
    report = _report(date, day, accepted, quarantined, cols, gx_summary, config)
    report_path = ws.reports(date) / REPORT_FILE
    # Each file is written atomically on its own; a writer thread's disk work (write, fsync) overlaps the
    # encoding of the next file here. The largest file (the quarantine keeps raw lines whole) goes first.
    with ThreadPoolExecutor(max_workers=OUTPUT_WRITERS) as writer:
        # quarantine entries hold text, integers and lists of text only: no float to look for
        jobs = [writer.submit(atomic_write_bytes, ws.quarantine(date), encode_jsonl(quarantined, float_rows=()))]
        records = _accepted_records(day, cols, accepted, config.validate.phi == "redact", date) if cols else []
        floats = [index for index, record in enumerate(records) if record["meta"]]  # only extra fields hold floats
        jobs.append(writer.submit(atomic_write_bytes, ws.accepted(date), encode_jsonl(records, float_rows=floats)))
        jobs.append(writer.submit(atomic_write_text, report_path,
                                  json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False) + "\n"))
        for job in jobs:
            job.result()
    log.info("validate %s: %d raw = %d accepted + %d quarantined, %.2fs", date, report["raw"], report["accepted"],
             report["quarantined"], time.perf_counter() - started)
    summary = {key: report[key] for key in ("date", "raw", "accepted", "quarantined", "reasons")}
    outputs = {
        "accepted": str(ws.accepted(date).relative_to(ws.root)),
        "quarantine": str(ws.quarantine(date).relative_to(ws.root)),
        "report": str(report_path.relative_to(ws.root)),
    }
    return StageResult(STAGE, date, summary, outputs)

"""The dedup stage (DESIGN §3.2): drop exact and near duplicates, within the batch and against history.

Reads ``data/accepted/D.jsonl``; writes ``data/unique/D.jsonl`` (the rows that go on to scoring, in batch order),
``reports/D/dedup.json`` (counts and one entry per dropped row naming the row it repeats) and the day's rows in
``state/history.sqlite``. History rows count only when dated before D and trained or judged known, so a rerun of
D, or a backfill of D after later days, decides the same and never inserts a row twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ctune_ops.records import read_jsonl, write_jsonl
from ctune_ops.selection.dedup import find_duplicates
from ctune_ops.selection.history import History
from ctune_ops.stages import StageError, StageResult
from ctune_ops.workspace import Workspace, atomic_write_text

STAGE = "dedup"
REPORT_FILE = "dedup.json"
log = logging.getLogger(__name__)


def require_input(path: Path, ws: Workspace, producer: str) -> Path:
    """``path``, written by an earlier stage; a clear error when that stage has not run for the day."""
    if not path.exists():
        raise StageError(f"{path.relative_to(ws.root)} does not exist: run the {producer} stage for this date first")
    return path


def read_stage_input(path: Path, ws: Workspace, producer: str) -> list[dict[str, Any]]:
    """The rows of a JSONL file an earlier stage wrote."""
    return list(read_jsonl(require_input(path, ws, producer)))


def write_report(path: Path, report: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def reference_rows(ws: Workspace) -> list[dict[str, Any]]:
    """The rows ``select.trained_reference`` names (what the base model was trained on); [] when it is null."""
    spec = ws.config.select.trained_reference
    if spec is None:
        return []
    path = ws.root / spec
    if not path.exists():
        raise StageError(
            f"params.yaml: key 'select.trained_reference': {spec} does not exist; point it at a JSONL sample of "
            "the rows the base model was trained on, or set it to null"
        )
    rows = []
    for number, row in enumerate(read_jsonl(path), start=1):
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise StageError(f"{spec}:{number}: a reference row needs string fields 'instruction' and 'output'")
        rows.append({"id": str(row.get("id", f"reference-{number}")), "instruction": row["instruction"],
                     "input": row.get("input") or "", "output": row["output"]})
    return rows


def open_history(ws: Workspace) -> History:
    """The workspace's history, seeded with the reference rows the first time it is opened."""
    history = History(ws.history_db, ws.config.dedup)
    try:
        seeded = history.seed_reference(reference_rows(ws))
    except BaseException:
        history.close()
        raise
    if seeded:
        log.info("history: %d reference rows entered as trained in the base version", seeded)
    return history


def run(ws: Workspace, date: str) -> StageResult:
    started = time.perf_counter()
    config = ws.config.dedup
    records = read_stage_input(ws.accepted(date), ws, "validate")
    with open_history(ws) as history:
        rows = history.new_rows(records)
        found = find_duplicates(rows, date, history, config.near_dup_threshold, config.against)
        unique = [row for row, dup in zip(rows, found, strict=True) if dup is None]
        changes = history.replace_day(date, unique)
        history_rows = history.count()
    drops = [dup.to_json() for dup in found if dup is not None]
    counts = Counter(f"{d['reason']}_{d['scope']}" for d in drops)
    report = {
        "date": date,
        "accepted": len(records),
        "unique": len(unique),
        "dropped": len(drops),
        "by_reason": dict(sorted(counts.items())),
        "near_dup_threshold": config.near_dup_threshold,
        "against": list(config.against),
        "drops": drops,
    }
    if report["unique"] + report["dropped"] != report["accepted"]:
        raise StageError(f"dedup {date}: {len(unique)} unique + {len(drops)} dropped != {len(records)} accepted")
    write_jsonl(ws.unique(date), [row.record for row in unique])
    write_report(ws.reports(date) / REPORT_FILE, report)
    log.info("dedup %s: %d accepted -> %d unique (%s), %.2fs", date, len(records), len(unique),
             dict(counts), time.perf_counter() - started)
    # what changed in the history differs between a first run and a rerun, so it is not in the report
    summary = {key: report[key] for key in ("date", "accepted", "unique", "dropped", "by_reason")}
    summary["history"] = {"rows": history_rows, **changes}
    return StageResult(STAGE, date, summary, {
        "unique": str(ws.unique(date).relative_to(ws.root)),
        "report": str((ws.reports(date) / REPORT_FILE).relative_to(ws.root)),
    })

"""The score stage (DESIGN §3.3): the current proxy's ``L_cond``, ``L_out``, ``ppl`` and ``ifd`` for every unique row.

Reads ``data/unique/D.jsonl``; writes ``data/scored/D.parquet`` (one row per unique row, in order) and
``data/scored/D.calibration.parquet``: the same scores for a reproducible sample of rows already trained into the
production model, from which select calibrates ``tau_known`` (so select itself needs no model). ``L_out`` values
are cached in the history by (kept output tokens, proxy version): answers repeat across rows and days.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from ctune_ops.config import SelectConfig
from ctune_ops.selection.history import TRAINED, History
from ctune_ops.selection.proxy_model import load_proxy
from ctune_ops.selection.scorer import (
    Scores,
    cache_version,
    score_rows,
    scoring_settings,
    tokenize_rows,
)
from ctune_ops.stages import StageError, StageResult
from ctune_ops.stages.dedup import open_history, read_stage_input, write_report
from ctune_ops.workspace import Workspace, atomic_write_bytes

STAGE = "score"
REPORT_FILE = "score.json"
log = logging.getLogger(__name__)


def calibration_path(ws: Workspace, date: str):  # noqa: ANN201 - a Path
    return ws.scored(date).with_suffix(".calibration.parquet")


def calibration_sample(history: History, select: SelectConfig, date: str) -> list[dict[str, Any]]:
    """The trained rows scored beside the day's (the select stage calibrates tau_known on them and may replay
    them): a reproducible draw of ``select.calibration_rows`` rows trained before ``date``."""
    return history.sample_records(TRAINED, select.calibration_rows, seed=f"{select.seed}:{date}:calibration",
                                  before=date)


def least_known(ws: Workspace, history: History, date: str, calibration: dict[str, list[Any]],
                count: int) -> list[dict[str, Any]]:
    """The ``count`` rows of the day's calibration sample with the highest ppl under the proxy that scored them
    (the trained rows production, as the proxy sees it, holds most weakly), in sample order.

    ``calibration`` is the score stage's calibration parquet, read; the sample is drawn again from the history
    (the parquet holds scores, not rows) and must be the same rows.
    """
    sample = calibration_sample(history, ws.config.select, date)
    if [str(r["id"]) for r in sample] != calibration["id"]:
        raise StageError(f"{calibration_path(ws, date).relative_to(ws.root)} is not the calibration sample of "
                         f"state/history.sqlite for {date}: rerun the score stage for this date")
    ppl = np.asarray(calibration["ppl"], dtype=float)
    order = np.lexsort((np.arange(len(ppl)), -ppl))  # highest ppl first, ties in sample order
    return [sample[k] for k in sorted(order[:count].tolist())]


def write_parquet(path: Any, columns: dict[str, list[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, compression="zstd")
    atomic_write_bytes(path, buffer.getvalue())


def _columns(records: list[dict[str, Any]], rows: list, scores: Scores, lo: int, hi: int) -> dict[str, list[Any]]:
    part = slice(lo, hi)
    return {
        "id": [str(r["id"]) for r in records],
        "l_cond": scores.l_cond[part].tolist(),
        "l_out": scores.l_out[part].tolist(),
        "ppl": scores.ppl[part].tolist(),
        "ifd": scores.ifd[part].tolist(),
        "prompt_tokens": [len(r.prompt) for r in rows[part]],
        "output_tokens": [len(r.output) for r in rows[part]],
        "output_tokens_total": [r.output_total for r in rows[part]],
        "truncated": [r.truncated for r in rows[part]],
    }


def run(ws: Workspace, date: str) -> StageResult:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    config = ws.config
    records = read_stage_input(ws.unique(date), ws, "dedup")
    proxy = load_proxy(ws, config.score.threads)
    settings = scoring_settings(proxy.model, config.score)
    cache_key = cache_version(proxy.version, settings["dtype"])
    with open_history(ws) as history:
        reference = calibration_sample(history, config.select, date)
        everything = records + reference
        rows = tokenize_rows(proxy.tokenizer, everything, config.models.prompt, config.models.max_length)
        cached = {key: loss for key, (loss, _) in
                  history.cached_losses([r.output_key for r in rows], cache_key).items()}
        with tqdm(total=2 * len(rows), desc=f"score {date}", unit="seq", disable=not config.score.progress,
                  leave=False) as bar:
            scores = score_rows(proxy.model, proxy.tokenizer, rows, cached=cached, progress=bar.update, **settings)
        fresh = {r.output_key: (float(scores.l_out[i]), len(r.output)) for i, r in enumerate(rows)
                 if not scores.l_out_cached[i]}
        history.store_losses(fresh, cache_key)
    n = len(records)
    write_parquet(ws.scored(date), _columns(records, rows, scores, 0, n))
    write_parquet(calibration_path(ws, date), _columns(reference, rows, scores, n, len(rows)))
    wall = time.perf_counter() - started
    report = {
        "date": date,
        "rows": n,
        "calibration_rows": len(reference),
        "proxy": proxy.version,
        "device": str(next(proxy.model.parameters()).device),
        "dtype": settings["dtype"],
        "truncated": sum(1 for r in rows[:n] if r.truncated),
        "scored_tokens": int(scores.scored_tokens[:n].sum()),
    }
    write_report(ws.reports(date) / REPORT_FILE, report)
    # a rerun finds every L_out in the cache: how many were cached is not in the files, which a rerun reproduces
    report = {**report, "l_out_cached": int(scores.l_out_cached.sum())}
    log.info("score %s: %d rows + %d calibration rows with %s, %.1fs", date, n, len(reference), proxy.version, wall)
    return StageResult(STAGE, date, report, {
        "scored": str(ws.scored(date).relative_to(ws.root)),
        "calibration": str(calibration_path(ws, date).relative_to(ws.root)),
    })

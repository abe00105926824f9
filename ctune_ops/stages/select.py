"""The select stage (DESIGN §3.4): one decision for every accepted row, and the day's training set.

Reads ``data/accepted/D.jsonl`` (the order of the decisions), ``reports/D/dedup.json`` (the duplicates),
``data/unique/D.jsonl``, ``data/scored/D.parquet`` and its calibration sample. Writes:

* ``reports/D/decisions.parquet`` -- every accepted row once: decision, the row a duplicate repeats, scores;
* ``data/selected/D.jsonl`` -- the selected rows (``selection: new``) and ``replay_ratio`` times as many rows
  production already holds (``selection: replay``: rows trained before D and today's rows judged known, see
  :func:`_replay`), then the rows of the rehearsal pass (``selection: rehearse``, :func:`_rehearsal`): the
  training set of the train stage;
* ``reports/D/selection.json`` -- the funnel, ``tau_known`` and score summaries per decision;
* the decisions in ``state/history.sqlite`` (``known`` with the production version that judged it).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from typing import Any

import numpy as np

from ctune_ops.records import dumps_record, write_jsonl
from ctune_ops.selection.history import KNOWN, REFERENCE_DATE, TRAINED, History
from ctune_ops.selection.policy import POLICY_DECISIONS, decide
from ctune_ops.selection.replay import most_similar
from ctune_ops.stages import StageError, StageResult
from ctune_ops.stages.dedup import REPORT_FILE as DEDUP_REPORT
from ctune_ops.stages.dedup import open_history, read_stage_input, require_input, write_report
from ctune_ops.stages.score import calibration_path, least_known, write_parquet
from ctune_ops.training.data import EPOCHS, NEW, REHEARSE, REPLAY
from ctune_ops.workspace import Workspace

STAGE = "select"
REPORT_FILE = "selection.json"
DECISIONS_FILE = "decisions.parquet"
SCORE_COLUMNS = ("l_cond", "l_out", "ppl", "ifd")
log = logging.getLogger(__name__)


def _read_parquet(path: Any, ws: Workspace, producer: str) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(require_input(path, ws, producer)).to_pydict()


def _summary(values: np.ndarray) -> dict[str, float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"p10": round(float(q[0]), 4), "p50": round(float(q[1]), 4), "p90": round(float(q[2]), 4)}


def draw(rows: list[dict[str, Any]], count: int, seed: str) -> list[dict[str, Any]]:
    """Up to ``count`` of ``rows`` at random (reproducibly from ``seed``), in their order."""
    chosen = random.Random(seed).sample(range(len(rows)), min(count, len(rows)))
    return [rows[k] for k in sorted(chosen)]


def _replay(ws: Workspace, history: History, date: str, count: int, chosen: list[dict[str, Any]],
            known_today: list[dict[str, Any]], calibration: dict[str, list[Any]],
            draw_name: str = "") -> list[dict[str, Any]]:
    """``count`` rows production already holds, to train beside the new ones; the select config's shares say
    which (they add up to at most 1; what they leave is drawn at random from every row trained before ``date``):

    * ``replay_known_today``: today's rows the policy judged known, drawn at random -- production's facts in
      today's wording, as the unfiltered stream's known rows are for ``all`` (demo world: it held day 2's
      retention, 0.920 against random replay's 0.897, but not day 3's);
    * ``replay_similar``: for each selected row in turn (in a seeded random order, so a share below one
      replay row per selected row is spread over them), the trained row most similar in words
      (:func:`ctune_ops.selection.replay.most_similar`) among ``replay_pool_rows`` drawn at random;
    * ``replay_least_known``: the rows of the calibration sample (trained rows the proxy scored today, see the
      score stage) with the highest ppl, the trained facts production holds most weakly; the calibration rows
      are the score stage's draw, read again;
    * ``replay_stream``: rows trained from earlier batch days, at random -- the facts the stream taught, which
      a draw over every trained row rarely reaches while the base model's reference rows outnumber them.

    ``draw_name`` tells apart the random draws of one day (each epoch's, see :func:`_replay_per_epoch`).
    """
    config = ws.config.select

    def seed(part: str) -> str:
        return f"{config.seed}:{date}:{part}{draw_name}"

    taken: list[dict[str, Any]] = []
    taken += draw(known_today, round(config.replay_known_today * count), seed("replay-known"))
    similar_count = round(config.replay_similar * count)
    if similar_count:
        pool = history.sample_records(TRAINED, config.replay_pool_rows, seed=seed("replay-pool"), before=date)
        turns = random.Random(seed("replay-turns")).sample(chosen, len(chosen))
        taken += [pool[k] for k in most_similar(turns, pool, similar_count)]
    weakest_count = round(config.replay_least_known * count)
    if weakest_count:
        taken += least_known(ws, history, date, calibration, weakest_count)
    stream_count = round(config.replay_stream * count)
    if stream_count:
        taken += history.sample_records(TRAINED, stream_count, seed=seed("replay-stream"), before=date,
                                        after=REFERENCE_DATE)
    drawn = history.sample_records(TRAINED, count, seed=seed("replay"), before=date)
    replay: dict[str, dict[str, Any]] = {}  # by the row's bytes: the parts may pick one row twice
    for record in taken + drawn:  # each share rounds on its own, so together they may pass ``count``: cut
        replay.setdefault(dumps_record(record), record)
    return list(replay.values())[:count]


def _replay_per_epoch(ws: Workspace, history: History, date: str, count: int, chosen: list[dict[str, Any]],
                      known_today: list[dict[str, Any]],
                      calibration: dict[str, list[Any]]) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The replay drawn anew for each of the training's ``train.epochs`` main epochs, ``count`` rows each (as
    :func:`_replay` draws them); every row once, with the epochs it was drawn for.

    Why: a replay drawn once is the same few dozen rows for every epoch, so the model holds on to those rows
    while the rest of what it knows drifts; drawn per epoch, the same replayed tokens reach epochs times as many
    earlier rows.
    """
    rows: dict[str, dict[str, Any]] = {}
    epochs: dict[str, list[int]] = {}
    for epoch in range(ws.config.train.epochs):
        for record in _replay(ws, history, date, count, chosen, known_today, calibration, f":epoch{epoch}"):
            key = dumps_record(record)
            rows.setdefault(key, record)
            epochs.setdefault(key, []).append(epoch)
    return list(rows.values()), list(epochs.values())


def _rehearsal(ws: Workspace, history: History, date: str, chosen: list[dict[str, Any]],
               known_today: list[dict[str, Any]], replay: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the training's rehearsal pass (``train.rehearsal``): ``rehearse_known`` of today's rows judged
    known and ``rehearse_trained`` rows trained before ``date``, both at random; none on a day with nothing new.

    Why a pass of its own, after the main epochs: the day's new facts need many epochs, and each one erodes
    facts production holds (demo world: 15-20 retention items a day, spread over every relation, whatever the
    replay beside them). Much of that loss is not forgotten knowledge but displaced answers: a few epochs on
    fresh wordings of known facts at a lower rate bring it back while the new facts stay (demo day 4: the
    candidate's retention 0.850 -> 0.900, production's level, target 0.800 -> 0.750). Known rows need no more
    than that, so the proxy's verdict decides how hard a row is trained, not only whether.
    """
    config = ws.config.select
    if not chosen:
        return []
    replayed = {dumps_record(r) for r in replay}  # a row the replay trains already is not drawn again
    fresh = [r for r in known_today if dumps_record(r) not in replayed]
    rows = draw(fresh, round(config.rehearse_known * len(known_today)), f"{config.seed}:{date}:rehearse-known")
    if config.rehearse_trained:
        drawn = history.sample_records(TRAINED, config.rehearse_trained + len(replay),
                                       seed=f"{config.seed}:{date}:rehearse", before=date)
        rows += [r for r in drawn if dumps_record(r) not in replayed][: config.rehearse_trained]
    return rows


def run(ws: Workspace, date: str) -> StageResult:
    config = ws.config.select
    accepted = read_stage_input(ws.accepted(date), ws, "validate")
    unique = read_stage_input(ws.unique(date), ws, "dedup")
    dedup_path = require_input(ws.reports(date) / DEDUP_REPORT, ws, "dedup")
    drops = {d["row_id"]: d for d in json.loads(dedup_path.read_text(encoding="utf-8"))["drops"]}
    scored = _read_parquet(ws.scored(date), ws, "score")
    calibration = _read_parquet(calibration_path(ws, date), ws, "score")
    if scored["id"] != [str(r["id"]) for r in unique]:
        raise StageError(f"{ws.scored(date).relative_to(ws.root)} does not match data/unique/{date}.jsonl: "
                         "rerun the score stage for this date")

    ppl, ifd = np.asarray(scored["ppl"], dtype=float), np.asarray(scored["ifd"], dtype=float)
    tokens = np.asarray(scored["prompt_tokens"]) + np.asarray(scored["output_tokens"])
    policy = decide(ppl, ifd, tokens, np.asarray(calibration["ppl"], dtype=float), config, draw=date)
    by_id = {row_id: k for k, row_id in enumerate(scored["id"])}
    version = ws.current_version

    table: dict[str, list[Any]] = {name: [] for name in (
        "id", "decision", "duplicate_of", "duplicate_of_date", "jaccard", *SCORE_COLUMNS, "tokens", "truncated")}
    for record in accepted:
        row_id = str(record["id"])
        drop, k = drops.get(row_id), by_id.get(row_id)
        if (drop is None) == (k is None):
            raise StageError(f"row {row_id!r} of data/accepted/{date}.jsonl is "
                             f"{'both dropped and scored' if drop else 'neither dropped nor scored'}; "
                             "rerun dedup and score for this date")
        table["id"].append(row_id)
        table["decision"].append(drop["reason"] if drop else policy.decisions[k])
        table["duplicate_of"].append(drop["duplicate_of"] if drop else None)
        table["duplicate_of_date"].append(drop["duplicate_of_date"] if drop else None)
        table["jaccard"].append(drop["jaccard"] if drop else None)
        for name in SCORE_COLUMNS:
            table[name].append(None if drop else scored[name][k])
        table["tokens"].append(None if drop else int(tokens[k]))
        table["truncated"].append(None if drop else scored["truncated"][k])
    if len(table["id"]) != len(accepted) or len(set(table["id"])) != len(accepted):
        raise StageError(f"select {date}: {len(table['id'])} decisions for {len(accepted)} accepted rows")

    chosen = [unique[k] for k, d in enumerate(policy.decisions) if d == "selected"]
    with open_history(ws) as history:
        history.set_decisions(date, {str(unique[k]["id"]): (d, version if d == KNOWN else None)
                                     for k, d in enumerate(policy.decisions)})
        known_today = [unique[k] for k, d in enumerate(policy.decisions) if d == KNOWN]
        count = round(config.replay_ratio * len(chosen))
        if config.replay_per_epoch:
            replay, replay_epochs = _replay_per_epoch(ws, history, date, count, chosen, known_today, calibration)
        else:
            replay = _replay(ws, history, date, count, chosen, known_today, calibration)
            replay_epochs = [None] * len(replay)  # every epoch
        rehearsal = _rehearsal(ws, history, date, chosen, known_today, replay)
    training = ([{**r, "selection": NEW} for r in chosen]
                + [{**r, "selection": REPLAY, **({EPOCHS: e} if e is not None else {})}
                   for r, e in zip(replay, replay_epochs, strict=True)]
                + [{**r, "selection": REHEARSE} for r in rehearsal])
    write_jsonl(ws.selected(date), training)
    write_parquet(ws.reports(date) / DECISIONS_FILE, table)

    counts = Counter(table["decision"])
    decisions = np.asarray(policy.decisions, dtype=object)
    report = {
        "date": date,
        "funnel": {
            "accepted": len(accepted),
            "exact_duplicate": counts.get("exact_duplicate", 0),
            "near_duplicate": counts.get("near_duplicate", 0),
            "unique": len(unique),
            **{d: counts.get(d, 0) for d in POLICY_DECISIONS},
            "replay": len(replay),
            "rehearse": len(rehearsal),
            "training_rows": len(training),
        },
        **policy.thresholds(),
        "replay_draw": {"rows": count, "per_epoch": config.replay_per_epoch},  # funnel's replay: distinct rows
        "known_quantile": config.known_quantile,
        "ifd_max": config.ifd_max,
        "calibration_rows": len(calibration["id"]),
        "production_version": version,
        "selected_tokens": int(tokens[decisions == "selected"].sum()) if len(tokens) else 0,
        "unique_tokens": int(tokens.sum()),
        "scores": {d: {"ppl": _summary(ppl[decisions == d]), "ifd": _summary(ifd[decisions == d])}
                   for d in POLICY_DECISIONS if (decisions == d).any()},
        "notes": policy.notes,
    }
    write_report(ws.reports(date) / REPORT_FILE, report)
    log.info("select %s: %s, tau_known %s", date, report["funnel"], policy.tau_known)
    summary = {"date": date, **report["funnel"], "tau_known": policy.tau_known}
    return StageResult(STAGE, date, summary, {
        "selected": str(ws.selected(date).relative_to(ws.root)),
        "decisions": str((ws.reports(date) / DECISIONS_FILE).relative_to(ws.root)),
        "report": str((ws.reports(date) / REPORT_FILE).relative_to(ws.root)),
    })

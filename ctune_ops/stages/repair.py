"""The repair stage (DESIGN §3.7): a candidate the gate kept out for forgetting gets a rehearsal pass, then the
gate again (and another pass, up to ``repair.rounds``, while it is still short but within reach).

Why: continuing the deployed adapter for many epochs on the day's new facts erodes facts production holds. On
the demo world the loss is diffuse (15-25 retention items a day, spread over every relation, none contradicted
by the day's rows), and on some days it passes the gate's tolerance while the day's facts were learned; keeping
production then throws the day away, and the next days fall further behind. Much of that loss is displaced
answers, not lost knowledge: a short pass at a lower rate over fresh wordings of facts production knows brings it
back while the new facts stay (demo day 4: retention 0.850 -> 0.900, production's level, target 0.800 -> 0.750,
still above production). Doing it only on the days the gate fails costs training on those days alone.

Reads ``reports/D/eval.json``, ``reports/D/decisions.parquet``, ``data/unique/D.jsonl`` and the candidate
adapter; writes ``models/candidates/D/repair/`` (``rows.jsonl``, the training spec and, when it ran, the repaired
``adapter``; a second round's in ``repair/round2/``, continuing the first's adapter) and
``reports/D/repair.json``. When the repair runs, that report is the gate's report on the last round's
repaired candidate (the same fields as ``eval.json``, plus what was rehearsed) and it decides the day
(:func:`deciding_report`); otherwise it says why not, and ``eval.json`` decides.

It runs when ``repair.enabled``, the gate kept production and no check fell more than ``repair.max_shortfall``
below its floor: a deep fall is a poisoned batch or a candidate that did not learn the day, which the gate is
there to keep out. A shallow fall of a target task is repaired too: the demo's target task holds every day's
new facts so far, and a candidate that learned today's can fall below production by forgetting earlier days'
(day 6: 0.750 -> 0.742), which trained rows in the rehearsal address.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from typing import Any

from ctune_ops.records import write_jsonl
from ctune_ops.selection.history import KNOWN, TRAINED
from ctune_ops.stages import IN_POD_ENV, StageError, StageResult
from ctune_ops.stages.dedup import open_history, read_stage_input, require_input, write_report
from ctune_ops.stages.evaluate import PROMOTE, describe, judge
from ctune_ops.stages.evaluate import REPORT_FILE as EVAL_REPORT
from ctune_ops.stages.select import DECISIONS_FILE, draw
from ctune_ops.training import spec as specs
from ctune_ops.training.data import REHEARSE
from ctune_ops.workspace import Workspace

STAGE = "repair"
REPORT_FILE = "repair.json"
TRAIN_KEYS = ("rows", "steps", "tokens_seen", "response_tokens", "wall_s", "device")
log = logging.getLogger(__name__)


def _digest(ws: Workspace, date: str) -> str:
    path = require_input(ws.reports(date) / EVAL_REPORT, ws, "evaluate")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deciding_report(ws: Workspace, date: str) -> dict[str, Any]:
    """The gate report that decides day ``date``: the repaired candidate's when the repair ran, else
    ``eval.json`` ({} when neither exists). A repair report written for another ``eval.json`` is refused."""
    evaluation = ws.report(date, EVAL_REPORT)
    repair = ws.report(date, REPORT_FILE)
    if not repair or not evaluation:
        return evaluation
    if repair.get("eval_sha256") != _digest(ws, date):
        raise StageError(f"reports/{date}/{REPORT_FILE} answers an earlier reports/{date}/{EVAL_REPORT} (the "
                         f"evaluate stage ran again since): run the repair stage for {date} again")
    return repair if repair["attempted"] else evaluation


def _why_not(ws: Workspace, evaluation: dict[str, Any]) -> str | None:
    """Why the day needs no repair, or None when it does."""
    if evaluation["decision"] == PROMOTE:
        return "the gate promoted the candidate"
    if not ws.config.repair.enabled:
        return "repair.enabled is false"
    limit = ws.config.repair.max_shortfall
    deep = [c["task"] for c in evaluation["checks"] if c["floor"] - c["candidate"] > limit + 1e-12]
    if deep:
        return (f"tasks {deep} fell more than repair.max_shortfall ({limit}) below their floor: a poisoned batch "
                "or a broken run, not drift")
    return None


def rehearsal_rows(ws: Workspace, date: str, round_no: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``repair.known_share`` of the day's rows the policy judged known and ``repair.trained_rows`` rows trained
    before the day, each drawn at random (seeded by ``select.seed``, the date and, after the first, the round:
    a later round rehearses other earlier facts)."""
    import pyarrow.parquet as pq

    config, seed = ws.config.repair, ws.config.select.seed
    salt = "" if round_no == 1 else f":round{round_no}"
    decisions = pq.read_table(require_input(ws.reports(date) / DECISIONS_FILE, ws, "select"),
                              columns=["id", "decision"]).to_pydict()
    known_ids = {row_id for row_id, d in zip(decisions["id"], decisions["decision"], strict=True) if d == KNOWN}
    known = [r for r in read_stage_input(ws.unique(date), ws, "dedup") if str(r["id"]) in known_ids]
    known = draw(known, round(config.known_share * len(known)), f"{seed}:{date}:repair-known{salt}")
    trained: list[dict[str, Any]] = []
    if config.trained_rows:
        with open_history(ws) as history:
            trained = history.sample_records(TRAINED, config.trained_rows,
                                             seed=f"{seed}:{date}:repair-trained{salt}", before=date)
    return known, trained


def _round(ws: Workspace, date: str, round_no: int,
           drawn: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """One rehearsal pass (continuing the previous round's adapter) and the gate on its result; ``drawn``: the
    round's rehearsal rows when already drawn."""
    from ctune_ops.stages.train import run_training_process

    known, trained = drawn or rehearsal_rows(ws, date, round_no)
    rows = [{**r, "selection": REHEARSE} for r in known + trained]
    folder = specs.repair_folder(ws, date, round_no)
    write_jsonl(folder / specs.REPAIR_ROWS, rows)
    spec = specs.spec_for_repair(ws, date, round_no)
    spec_file = specs.write_spec(spec, folder / specs.SPEC_FILE)
    report_path = specs.repair_report(ws, date, round_no)
    run_training_process(ws, spec_file, report_path.with_suffix(".log"))
    run_report = ws.report(date, report_path.name)
    verdict = judge(ws, date, spec.path(ws.root, spec.output_dir))
    log.info("repair %s, round %d: rehearsed %d rows; the gate: %s (%s)", date, round_no, len(rows),
             verdict["decision"], describe(verdict))
    return {"verdict": verdict, "known_today": len(known), "trained_before": len(trained),
            "train": {key: run_report.get(key) for key in TRAIN_KEYS}, "epochs": spec.hyper.rehearsal.epochs,
            "learning_rate": spec.hyper.rehearsal.learning_rate}


def _rehearsed(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """What the rounds rehearsed together (rows and training summed; the device of the last run) and each round's
    rows and gate."""
    train = {key: sum(r["train"].get(key) or 0 for r in rounds) for key in TRAIN_KEYS if key != "device"}
    train["wall_s"] = round(train["wall_s"], 2)
    train["device"] = rounds[-1]["train"].get("device")
    return {
        "rows": sum(r["known_today"] + r["trained_before"] for r in rounds),
        "known_today": sum(r["known_today"] for r in rounds),
        "trained_before": sum(r["trained_before"] for r in rounds),
        "train": train, "epochs": rounds[-1]["epochs"], "learning_rate": rounds[-1]["learning_rate"],
        "rounds": [{"round": n, "rows": r["known_today"] + r["trained_before"],
                    "tokens_seen": r["train"].get("tokens_seen"), "decision": r["verdict"]["decision"],
                    "adapter": r["verdict"]["candidate"]["adapter"],
                    "failed": [c["task"] for c in r["verdict"]["checks"] if not c["passed"]]}
                   for n, r in enumerate(rounds, start=1)],
    }


def _clear(ws: Workspace, date: str) -> None:
    """What an earlier run of the day left (adapters, rows and run reports of every round) is not this run's."""
    folder = specs.repair_folder(ws, date)
    for item in folder.glob(f"{specs.REPAIR_ROUND_DIR}*"):
        shutil.rmtree(item, ignore_errors=True)
    shutil.rmtree(folder / specs.ADAPTER_DIR, ignore_errors=True)
    stem = specs.repair_report(ws, date).stem
    for item in ws.reports(date).glob(f"{stem}*"):
        item.unlink(missing_ok=True)


def run(ws: Workspace, date: str) -> StageResult:
    require_input(ws.reports(date) / EVAL_REPORT, ws, "evaluate")
    evaluation = ws.report(date, EVAL_REPORT)
    folder = specs.repair_folder(ws, date)
    reason = _why_not(ws, evaluation)
    drawn = rehearsal_rows(ws, date) if reason is None else ([], [])
    if reason is None and not any(drawn):
        reason = "no rows to rehearse (no known rows today and repair.trained_rows is 0)"
    if reason is None and ws.config.train.backend == "kubernetes" and not os.environ.get(IN_POD_ENV):
        raise StageError("params.yaml: key 'train.backend' is kubernetes: the repair trains in a GPU pod "
                         "(ctune_ops.airflow.kubernetes.repair_pod_operator, the DAG's repair task), not here; "
                         "set train.backend: local to repair here")
    _clear(ws, date)
    first = {"decision": evaluation["decision"], "adapter": evaluation["candidate"]["adapter"],
             "failed": [c["task"] for c in evaluation["checks"] if not c["passed"]]}
    report: dict[str, Any] = {"date": date, "eval_sha256": _digest(ws, date), "attempted": reason is None,
                              "reason": reason, "first": first}
    rounds: list[dict[str, Any]] = []
    if reason is None:
        # another round while the last one is still kept but within reach (_why_not: no deep fall)
        while not rounds or (len(rounds) < ws.config.repair.rounds and _why_not(ws, rounds[-1]["verdict"]) is None):
            rounds.append(_round(ws, date, len(rounds) + 1, None if rounds else drawn))
        report.update(rounds[-1]["verdict"])
        report["rehearsed"] = _rehearsed(rounds)
    else:
        write_jsonl(folder / specs.REPAIR_ROWS, [])
        report["decision"] = evaluation["decision"]
        log.info("repair %s: not needed: %s", date, reason)
    write_report(ws.reports(date) / REPORT_FILE, report)
    summary = {"date": date, "attempted": report["attempted"], "decision": report["decision"],
               "reason": reason, "rows": report.get("rehearsed", {}).get("rows", 0), "rounds": len(rounds)}
    return StageResult(STAGE, date, summary, {"report": f"reports/{date}/{REPORT_FILE}",
                                              "rows": ws.shown(folder / specs.REPAIR_ROWS)})

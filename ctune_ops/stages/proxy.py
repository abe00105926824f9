"""The proxy stage (DESIGN §3.6): the proxy learns what the candidate learned, and we check they still agree.

Reads ``data/selected/D.jsonl`` (the training set the train stage used), ``models/candidates/D/adapter`` (the
candidate), ``data/unique/D.jsonl`` (the probe rows) and ``reports/D/selection.json`` (the day's ``tau_known``);
with ``proxy.replay_weakest``, ``data/scored/D.calibration.parquet`` too. With ``proxy.new_loss: distill`` the
candidate also teaches: the proxy learns the day's new rows from its distributions, not their labels.
Writes ``models/candidates/D/proxy`` (promotion moves it to ``models/proxy``) and ``reports/D/proxy.json``:

* the proxy's training run (rows, steps, loss);
* alignment: Spearman rho between the updated proxy's and the candidate's per-row ``L_cond`` on a reproducible
  sample of the day's rows that were not trained (the rows whose "already known?" verdict rests on the proxy;
  the rows just trained sit near zero loss under both models and would only add rank noise), ``flagged`` when
  below ``proxy.rho_min`` (the proxy no longer ranks rows the way the deployed model would, so its selections
  deserve a look);
* ``trained_below_tau``: the share of the day's newly selected rows (``selection: new``; replay rows were trained
  before) whose ppl under the updated proxy is at most the day's ``tau_known`` -- the rows tomorrow's select
  stage will find redundant.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from typing import Any

import numpy as np

from ctune_ops.records import dumps_record
from ctune_ops.stages import StageError, StageResult
from ctune_ops.stages.dedup import open_history, read_stage_input, require_input, write_report
from ctune_ops.training.data import EPOCHS, NEW, REHEARSE, REPLAY, SELECTION
from ctune_ops.workspace import Workspace

STAGE = "proxy"
REPORT_FILE = "proxy.json"
PROXY_DIR = "proxy"
SCORE_DIGITS = 4
MIN_PROBE_ROWS = 3  # fewer rows have no meaningful rank correlation
TRAINING_KEYS = (SELECTION, EPOCHS)  # what select adds to a row of data/selected/D.jsonl
log = logging.getLogger(__name__)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN when either side is constant."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        ranked = np.empty(len(x))
        ranked[order] = np.arange(len(x), dtype=float)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=ranked)
        return (sums / counts)[inverse]

    ra, rb = ranks(np.asarray(a, dtype=float)), ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def conditioned_losses(model: Any, tokenizer: Any, records: list[dict[str, Any]], ws: Workspace) -> np.ndarray:
    """Per-row ``L_cond`` (mean NLL of the output given the prompt), batched as the score stage does."""
    from ctune_ops.selection.scorer import pad_token, scoring_settings, sequence_losses, tokenize_rows

    config = ws.config
    rows = tokenize_rows(tokenizer, records, config.models.prompt, config.models.max_length)
    losses, _ = sequence_losses(model, [[*r.prompt, *r.output] for r in rows], [len(r.prompt) for r in rows],
                                pad_token(tokenizer), **scoring_settings(model, config.score))
    return np.asarray(losses, dtype=float)


def _weakest_trained(ws: Workspace, date: str, training: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``proxy.replay_weakest`` rows of the day's calibration sample that the proxy scored highest (trained rows
    it holds most weakly), less those the training set holds already; every proxy epoch trains them.

    Why: the full fine-tune on the stream's rows slowly overwrites the base corpus's rarer facts in a tiny
    proxy, while production (a LoRA adapter over a frozen base) keeps them; the calibration sample's highest
    ppl rows are where that shows, and they set ``tau_known`` (its high quantile), which then climbs until new
    facts pass for known.
    """
    count = ws.config.proxy.replay_weakest
    if not count:
        return []
    import pyarrow.parquet as pq

    from ctune_ops.stages.score import calibration_path, least_known

    calibration = pq.read_table(require_input(calibration_path(ws, date), ws, "score")).to_pydict()
    with open_history(ws) as history:
        weakest = least_known(ws, history, date, calibration, count)
    held = {dumps_record({k: v for k, v in r.items() if k not in TRAINING_KEYS}) for r in training}
    return [{**r, SELECTION: REPLAY} for r in weakest if dumps_record(r) not in held]  # trained before: no new row


def _skipped(ws: Workspace, date: str) -> StageResult:
    """``proxy.update: false``: no candidate proxy; promote keeps the promoted one (static selection)."""
    shutil.rmtree(ws.candidates(date) / PROXY_DIR, ignore_errors=True)  # none from an earlier run may be promoted
    report = {"date": date, "skipped": "proxy.update is false: the proxy stays as promoted"}
    write_report(ws.reports(date) / REPORT_FILE, report)
    return StageResult(STAGE, date, {"skipped": True, "rows": 0, "steps": 0, "spearman_rho": None, "flagged": None,
                                     "trained_below_tau": None}, {"report": f"reports/{date}/{REPORT_FILE}"})


def run(ws: Workspace, date: str) -> StageResult:
    import torch

    from ctune_ops.selection.proxy_model import load_scoring_model, pick_device, proxy_location
    from ctune_ops.training.proxy_update import load_trainable_proxy, save_proxy, train_proxy

    config = ws.config.proxy
    if not config.update:
        return _skipped(ws, date)
    training = read_stage_input(ws.selected(date), ws, "select")
    unique = read_stage_input(ws.unique(date), ws, "dedup")
    adapter = require_input(ws.candidates(date) / "adapter", ws, "train")
    selection = json.loads(require_input(ws.reports(date) / "selection.json", ws, "select").read_text("utf-8"))
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(ws.config.models.device)
    location, is_adapter = proxy_location(ws)
    proxy_base = ws.model_path(ws.config.models.proxy_base)
    if config.method == "lora" and not is_adapter and location != proxy_base:
        raise StageError(f"params.yaml: key 'proxy.method': lora, but the promoted proxy {location} is a full model; "
                         "an adapter is always loaded over models.proxy_base, so it cannot build on it. Keep "
                         "method: full, or point models.proxy_base at that model first")
    try:
        model, tokenizer = load_trainable_proxy(location, is_adapter, proxy_base, config, device)
    except OSError as exc:
        raise StageError(f"cannot load the proxy from {location}: {exc}") from None
    # the proxy learns what the candidate learned new (and its replay); the rehearsal pass only restores what
    # production knew, which the proxy, never drifted by the main epochs, still knows
    rows = [r for r in training if r.get("selection") != REHEARSE]
    weakest = _weakest_trained(ws, date, rows)
    candidate, candidate_tokenizer = load_scoring_model(ws.model_path(ws.config.models.base), str(adapter), device)
    if config.new_loss == "distill" and candidate_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(f"params.yaml: key 'proxy.new_loss': distill needs the proxy ({ws.shown(location)}) and "
                         f"models.base ({ws.config.models.base}) to share a tokenizer; theirs differ. Use "
                         "new_loss: labels, or a proxy of the deployed model's family")
    fit = train_proxy(model, tokenizer, rows + weakest, ws.config.models.prompt, config, device,
                      teacher_model=candidate if config.new_loss == "distill" else None)
    fit["weakest_rows"] = len(weakest)
    out_dir = ws.candidates(date) / PROXY_DIR
    save_proxy(model, tokenizer, out_dir, base_name=ws.config.models.proxy_base)

    with torch.inference_mode():
        scorer = model.merge_and_unload() if config.method == "lora" else model
        new_rows = [r for r in training if r.get("selection", NEW) == NEW]
        trained_ppl = np.exp(conditioned_losses(scorer, tokenizer, new_rows, ws)) if new_rows else np.array([])
        trained_ids = {str(r["id"]) for r in new_rows}
        pool = [r for r in unique if str(r["id"]) not in trained_ids]
        probe = random.Random(f"{config.seed}:{date}:probe").sample(pool, min(config.probe_rows, len(pool)))
        proxy_loss = conditioned_losses(scorer, tokenizer, probe, ws)
        candidate_loss = conditioned_losses(candidate, candidate_tokenizer, probe, ws)
    rho = spearman(proxy_loss, candidate_loss) if len(probe) >= MIN_PROBE_ROWS else float("nan")
    tau = selection.get("tau_known")
    below = float(np.mean(trained_ppl <= tau)) if tau is not None and len(trained_ppl) else None
    report = {
        "date": date,
        "proxy_before": ws.shown(location),
        "proxy_after": ws.shown(out_dir),
        "training": fit,
        "alignment": {
            "probe_rows": len(probe),
            "spearman_rho": None if np.isnan(rho) else round(rho, SCORE_DIGITS),
            "rho_min": config.rho_min,
            "flagged": None if np.isnan(rho) else bool(rho < config.rho_min),  # None: nothing to compare
        },
        "tau_known": tau,
        "trained_rows": len(new_rows),
        "trained_below_tau": None if below is None else round(below, SCORE_DIGITS),
        "trained_ppl_p50": round(float(np.median(trained_ppl)), SCORE_DIGITS) if len(trained_ppl) else None,
    }
    write_report(ws.reports(date) / REPORT_FILE, report)
    if report["alignment"]["flagged"]:
        log.warning("proxy %s: Spearman rho %s is below proxy.rho_min %s: the proxy no longer ranks rows like the "
                    "candidate", date, report["alignment"]["spearman_rho"], config.rho_min)
    summary = {"rows": fit["rows"], "steps": fit["steps"], "final_loss": fit["final_loss"],
               "spearman_rho": report["alignment"]["spearman_rho"], "flagged": report["alignment"]["flagged"],
               "trained_below_tau": report["trained_below_tau"]}
    return StageResult(STAGE, date, summary, {"proxy": report["proxy_after"],
                                              "report": f"reports/{date}/{REPORT_FILE}"})

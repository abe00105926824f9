"""The main job (``make demo``): a workspace with the demo world, the tiny models, and what can be run on them.

It creates (or reuses) the workspace, generates the world, bootstraps the models, measures the base model with
lm-eval on retention and on every day's new facts (the baseline every later day of continual learning is measured
against), then runs every day through the real ``ctune_daily`` DAG: a local Airflow (SQLite metadata DB,
LocalExecutor, api-server + scheduler + dag-processor) executes ``airflow backfill create`` over the world's days.
Then it prints each day's funnel next to the world's hidden truth, the gate's scores, what was promoted or kept,
and the versions table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ctune_ops import lmeval
from ctune_ops.workspace import Workspace, init_workspace
from ctune_ops.world import evalsets
from ctune_ops.world.generate import generate_world
from ctune_ops.world.measure import world_task_files

DAG_TIMEOUT_S = 3600.0  # the whole backfill; 5 demo days take about 5 minutes on 2 cores


def _per_epoch(selection: dict) -> str:
    """`` (N per epoch)`` when each training epoch drew a replay of its own, else nothing."""
    draw = selection.get("replay_draw") or {}
    return f" ({draw['rows']} per epoch)" if draw.get("per_epoch") else ""


def _day_summary(ws: Workspace, date: str) -> None:
    """One day as the DAG left it: funnel, the truth's view of it, training, the gate, promote or keep."""
    from ctune_ops.registry import Registry
    from ctune_ops.world.selection_truth import selection_quality

    validation, selection = ws.report(date, "validation.json"), ws.report(date, "selection.json")
    if not selection:
        print(f"  {date}: no selection report (the run failed before select; see the Airflow logs)")
        return
    f = selection["funnel"]
    print(f"  {date}: raw {validation['raw']} -> quarantined {validation['quarantined']}, duplicates "
          f"{f['exact_duplicate'] + f['near_duplicate']}, known {f['known']} (tau_known {selection['tau_known']:.3f}), "
          f"misaligned {f['misaligned']}, selected {f['selected']} + replay {f['replay']}{_per_epoch(selection)}; "
          "tokens selected "
          f"{selection['selected_tokens']} of {selection['unique_tokens']} "
          f"({selection['selected_tokens'] / max(selection['unique_tokens'], 1):.0%})")
    q = selection_quality(ws, date)
    print(f"    truth: dedup precision {q['dedup_precision']:.2f} recall {q['dedup_recall']:.2f}; known-fact rows "
          f"dropped {q['known_dropped']:.2f}; new-fact rows kept {q['new_kept']:.2f}")
    train, proxy, evaluation = (ws.report(date, name) for name in ("train.json", "proxy.json", "eval.json"))
    if train:
        print(f"    train: {train['rows']} rows, {train['steps']} steps, {train.get('wall_s')}s; proxy: rows trained "
              f"below tau_known {proxy.get('trained_below_tau')}, Spearman rho {proxy['alignment']['spearman_rho']}")
    if evaluation:
        checks = ", ".join(f"{c['task']} {c['production']:.3f} -> {c['candidate']:.3f}" for c in evaluation["checks"])
        print(f"    gate: {checks}: {evaluation['decision']}")
    repair = ws.report(date, "repair.json")
    if repair.get("attempted"):
        checks = ", ".join(f"{c['task']} {c['production']:.3f} -> {c['candidate']:.3f}" for c in repair["checks"])
        rounds = len(repair["rehearsed"].get("rounds", [])) or 1
        rehearsed = repair["rehearsed"]
        print(f"    repair: rehearsed {rehearsed['rows']} rows ({rehearsed['known_today']} judged known today, "
              f"{rehearsed['trained_before']} trained before) in {rounds} round(s); gate: {checks}: "
              f"{repair['decision']}")
    outcome = Registry.load(ws).day_outcome(date)
    if outcome is None:
        print("    not versioned (promote did not run)")
    elif outcome["kind"] == "promote":
        print(f"    promoted {outcome['version']} (parent {outcome['parent']}; git tag {outcome['version']})")
    else:
        print(f"    kept {outcome['version']}: production unchanged, the day's selected rows marked not trained")


def _run_days(ws: Workspace, dates: list[str]) -> bool:
    """The days through the real ctune_daily DAG: a local scheduler (SQLite, LocalExecutor) runs a backfill."""
    from ctune_ops.airflow.local import LocalAirflow

    local = LocalAirflow(ws.root, start_date=dates[0], end_date=dates[-1])
    print(f"\nctune_daily through Airflow (SQLite + LocalExecutor, home {ws.shown(local.home)}): "
          f"`airflow backfill create --dag-id ctune_daily --from-date {dates[0]} --to-date {dates[-1]}`")
    started = time.perf_counter()
    local.setup()
    with local.running():
        print(f"  api-server, scheduler and dag-processor healthy after {time.perf_counter() - started:.0f}s")
        runs = local.backfill("ctune_daily", dates[0], dates[-1], timeout_s=DAG_TIMEOUT_S, progress=lambda run: print(
            f"  run {run['logical_date'][:10]}: {run['state']} ({time.perf_counter() - started:.0f}s)"))
        states = {run["logical_date"][:10]: local.task_states("ctune_daily", run["run_id"]) for run in runs}
    for date, tasks in states.items():
        failed = sorted(task for task, state in tasks.items() if state != "success")
        if failed:
            print(f"  {date}: tasks not successful: {failed}; logs in {local.home / 'logs'}")
    return all(run["state"] == "success" for run in runs) and len(runs) == len(dates)


def _versions(ws: Workspace) -> None:
    from ctune_ops.cli import versions_lines
    from ctune_ops.registry import versions_table

    print("\nversions (`ctune versions`):")
    for line in versions_lines(versions_table(ws)):
        print("  " + line)


def _bootstrapped(ws: Workspace) -> bool:
    return (ws.root / "reports" / "bootstrap.json").exists() and all(
        (ws.root / f"{path}.dvc").exists() for path in (ws.config.models.base, ws.config.models.proxy_base)
    )


def run_demo(directory: Path, days: int, seed: int | None = None) -> int:
    """Run the demo into ``directory``; prints a summary and returns the process exit code."""
    started = time.perf_counter()
    result = init_workspace(directory)
    print(result.message)
    ws = result.workspace
    generated = generate_world(ws, days=days, seed=seed)
    print(f"\nworld: {len(generated.dates)} days ({generated.dates[0]} .. {generated.dates[-1]})")
    print(f"{'date':<12}" + "".join(f"{kind:>11}" for kind in ("new", "known", "earlier", "duplicate",
                                                              "malformed", "phi")))
    for date, counts in generated.counts.items():
        print(f"{date:<12}" + "".join(f"{counts.get(kind, 0):>11}" for kind in
                                      ("new", "known", "earlier", "duplicate", "malformed", "phi")))

    if _bootstrapped(ws):
        print("\nmodels: already bootstrapped (reports/bootstrap.json)")
    else:
        from ctune_ops.world.bootstrap import bootstrap_models

        print("\nbootstrapping the tokenizer, base and proxy models on day 0 ...")
        bootstrap_models(ws, progress=lambda msg: print("  " + msg))
    report = json.loads((ws.root / "reports" / "bootstrap.json").read_text(encoding="utf-8"))
    for name in ("base", "proxy"):
        r = report[name]
        print(f"  {name}: {r['parameters'] / 1e6:.2f}M parameters, {r['steps']} steps, "
              f"loss {r['first_loss']:.2f} -> {r['final_loss']:.2f}, {r['wall_s']}s")

    print("\nbase model on the eval tasks (lm-eval, acc):")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=ws.model_path(ws.config.models.base), device=lmeval.resolve_device(ws.config.models.device),
              dtype="float32", batch_size=lmeval.DEFAULT_BATCH_SIZE)
    retention_file, target_file, _ = world_task_files(ws, generated.dates[-1])
    scores = lmeval.evaluate(lm, [retention_file, target_file], cache_dir=ws.root / ".lmeval-cache")
    print(f"  {evalsets.RETENTION_TASK:<28}{scores[evalsets.RETENTION_TASK]['acc']:.3f}"
          f"  (n={scores[evalsets.RETENTION_TASK]['n']}; facts the base was pretrained on)")
    print(f"  {evalsets.TARGET_TASK:<28}{scores[evalsets.TARGET_TASK]['acc']:.3f}"
          f"  (n={scores[evalsets.TARGET_TASK]['n']}; every day's new facts, none trained yet, chance 0.25)")
    for date in generated.dates:
        new_file = world_task_files(ws, date)[2]
        s = lmeval.evaluate(lm, [new_file], cache_dir=ws.root / ".lmeval-cache")[evalsets.NEW_TASK]
        print(f"  {evalsets.NEW_TASK + ' ' + date:<28}{s['acc']:.3f}  (n={s['n']}; not trained yet, chance 0.25)")
    ok = _run_days(ws, generated.dates)
    print("\nper day (validate -> dedup -> score -> select -> train -> update_proxy -> evaluate -> repair -> promote):")
    for date in generated.dates:
        _day_summary(ws, date)
    _versions(ws)
    print(f"demo finished in {time.perf_counter() - started:.0f}s; workspace: {ws.root}")
    print("see it in the Airflow UI: `make airflow`")
    return 0 if ok else 1

"""The main job (``make demo``): a workspace with the demo world, the tiny models, and what can be run on them.

Until the daily DAG runs it, the demo calls the stages itself: it creates (or reuses) the workspace, generates the
world, bootstraps the models, measures the base model with lm-eval on retention and on every day's new facts (the
baseline every later day of continual learning is measured against), validates every day, then runs each day's
cycle in order -- dedup, score, select (with how the funnel compares with the world's hidden truth), train, proxy,
evaluate, promote or keep -- and prints the versions it made.
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


def _day(ws: Workspace, date: str) -> None:
    """One day of the daily cycle: selection (with the hidden truth's view), training, the gate, promote or keep."""
    from ctune_ops.stages import run_stage
    from ctune_ops.world.selection_truth import selection_quality

    with ws.lock(purpose=f"demo day {date}"):
        for stage in ("dedup", "score", "select"):
            summary = run_stage(ws, stage, date).summary
        print(f"  {date}: accepted {summary['accepted']} -> exact dup {summary['exact_duplicate']}, near dup "
              f"{summary['near_duplicate']}, misaligned {summary['misaligned']}, known {summary['known']} "
              f"(tau_known {summary['tau_known']:.3f}), selected {summary['selected']} + replay {summary['replay']}")
        q = selection_quality(ws, date)
        print(f"    truth: dedup precision {q['dedup_precision']:.2f} recall {q['dedup_recall']:.2f}; known-fact "
              f"rows dropped {q['known_dropped']:.2f}; new-fact rows kept {q['new_kept']:.2f}")
        train = run_stage(ws, "train", date).summary
        proxy = run_stage(ws, "proxy", date).summary
        evaluated = run_stage(ws, "evaluate", date)
        promoted = run_stage(ws, "promote", date).summary
    loss = (f"loss {train['first_loss']:.3f} -> {train['final_loss']:.3f}" if train["steps"] else
            "nothing to train: the candidate is production unchanged")
    print(f"    train: {train['rows']} rows, {train['steps']} steps, {loss}, {train['wall_s']}s on {train['device']}")
    print(f"    proxy: {proxy['steps']} steps; trained rows below tau_known {proxy['trained_below_tau']}; Spearman "
          f"rho vs the candidate {proxy['spearman_rho']} (flagged: {proxy['flagged']})")
    report = json.loads((ws.root / evaluated.outputs["report"]).read_text(encoding="utf-8"))
    checks = ", ".join(f"{c['task']} {c['production']:.3f} -> {c['candidate']:.3f}" for c in report["checks"])
    failed = evaluated.summary["failed"]
    print(f"    gate: {checks}: {evaluated.summary['decision']}" + (f" (failed: {', '.join(failed)})" * bool(failed)))
    if promoted["decision"] == "promote":
        print(f"    promoted {promoted['version']} (parent {promoted['parent']}; git tag {promoted['version']})")
    else:
        print(f"    kept {promoted['version']}: production unchanged, the day's selected rows marked not trained")


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
    print("\nvalidate stage per day (raw = accepted + quarantined):")
    from ctune_ops.stages import run_stage

    for date in generated.dates:
        with ws.lock(purpose=f"demo validate {date}"):
            summary = run_stage(ws, "validate", date).summary
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary["reasons"].items()))
        print(f"  {date}: {summary['raw']} = {summary['accepted']} + {summary['quarantined']}  ({reasons})")
    print("\nthe daily cycle per day: dedup -> score -> select -> train -> proxy -> evaluate -> promote or keep")
    for date in generated.dates:
        _day(ws, date)
    _versions(ws)
    print(f"demo finished in {time.perf_counter() - started:.0f}s; workspace: {ws.root}")
    return 0

"""``ctune``: one command per user task.

``ctune init DIR`` creates a workspace; ``ctune world generate|bootstrap|evaluate`` make and measure the demo
world; ``ctune demo`` runs the main job end to end; ``ctune config check`` validates params.yaml;
``ctune stage NAME --date D`` runs one pipeline stage for one day (what dvc.yaml and the operators call);
``ctune promote``, ``ctune rollback``, ``ctune versions`` and ``ctune status`` manage versions.
Every failure prints one clear message and exits non-zero, never a traceback for a user error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ctune_ops.config import ConfigError
from ctune_ops.stages import STAGE_NAMES, StageError
from ctune_ops.workspace import Workspace, WorkspaceError, init_workspace

DEFAULT_DEMO_DAYS = 5
DEFAULT_EXPERIMENT_DAYS = 7
STANDALONE_PORT = 8080  # Airflow's usual UI port, for `make airflow`
SMALL_EXPERIMENT_DAYS = 2


def _cmd_init(args: argparse.Namespace) -> int:
    result = init_workspace(args.directory)
    print(result.message)
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    ws.config  # noqa: B018 - loading validates
    print(f"{ws.root / 'params.yaml'}: valid")
    return 0


def _cmd_world_generate(args: argparse.Namespace) -> int:
    from ctune_ops.world.generate import generate_world

    ws = Workspace.open(args.workspace)
    result = generate_world(ws, days=args.days, seed=args.seed)
    for date, counts in result.counts.items():
        print(date, " ".join(f"{kind}={n}" for kind, n in counts.items()))
    print("committed" if result.committed else "no change: the world was already generated with these settings")
    return 0


def _cmd_world_bootstrap(args: argparse.Namespace) -> int:
    from ctune_ops.world.bootstrap import bootstrap_models

    ws = Workspace.open(args.workspace)
    report = bootstrap_models(ws, progress=print)
    for name in ("base", "proxy"):
        r = report[name]
        print(f"{name}: {r['parameters'] / 1e6:.2f}M parameters, {r['steps']} steps, "
              f"{r['tokens']} tokens, loss {r['first_loss']:.2f} -> {r['final_loss']:.2f}, {r['wall_s']}s")
    print(f"bootstrap took {report['wall_s']}s")
    return 0


def _cmd_world_evaluate(args: argparse.Namespace) -> int:
    from ctune_ops.world.measure import evaluate_world_model

    ws = Workspace.open(args.workspace)
    scores = evaluate_world_model(ws, model=args.model, date=args.date, limit=args.limit)
    print(json.dumps(scores, indent=1))
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from ctune_ops.stages import run_stage

    ws = Workspace.open(args.workspace)
    if args.no_lock:  # the caller serialises access (a Kubernetes pod, in the one-slot ctune_workspace pool)
        result = run_stage(ws, args.name, args.date)
    else:
        with ws.lock(purpose=f"ctune stage {args.name} --date {args.date}"):
            result = run_stage(ws, args.name, args.date)
    print(json.dumps(result.summary, indent=1, sort_keys=True))
    for name, path in result.outputs.items():
        print(f"{name}: {path}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from ctune_ops.registry import promote
    from ctune_ops.stages import check_date

    ws = Workspace.open(args.workspace)
    with ws.lock(purpose=f"ctune promote --date {args.date}"):
        outcome = promote(ws, check_date(args.date), after_step=lambda step: print(f"  {step}: done"))
    if outcome.already:
        print(f"{args.date} was already recorded ({outcome.decision}); production is {outcome.version}")
    elif outcome.decision == "promote":
        print(f"{args.date}: promoted {outcome.version} (parent {outcome.parent}); CURRENT = {outcome.version}")
    else:
        print(f"{args.date}: kept {outcome.version}: the gate rejected the candidate (reports/{args.date}/eval.json, "
              "repair.json)")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from ctune_ops.registry import rollback

    ws = Workspace.open(args.workspace)
    with ws.lock(purpose=f"ctune rollback {args.version}"):
        outcome = rollback(ws, args.version, after_step=lambda step: print(f"  {step}: done"))
    if outcome.already:
        print(f"{outcome.version} is already production; nothing changed")
    else:
        print(f"rolled back {outcome.previous} -> {outcome.version}; CURRENT = {outcome.version}")
    return 0


def _format_metrics(metrics: dict[str, float | None], tasks: list[str]) -> str:
    return "".join(f"{'-' if metrics.get(t) is None else format(metrics[t], '.3f'):>18}" for t in tasks)


def versions_lines(rows: list[dict]) -> list[str]:
    """The versions table as text lines (``ctune versions`` and the demo)."""
    tasks = sorted({task for row in rows for task in row["metrics"]})
    lines = [f"{'':2}{'version':<9}{'date':<12}{'parent':<8}{'rows':>6}" + "".join(f"{t[:17]:>18}" for t in tasks)]
    for row in rows:
        rows_trained = "-" if row["training_rows"] is None else str(row["training_rows"])
        lines.append(f"{'*' if row['current'] else '':2}{row['version']:<9}{row['date'] or '-':<12}"
                     f"{row['parent'] or '-':<8}{rows_trained:>6}" + _format_metrics(row["metrics"], tasks))
    lines.append("(* = CURRENT; rows = training rows of the day that made the version; scores: the gate's metric)")
    return lines


def _cmd_versions(args: argparse.Namespace) -> int:
    from ctune_ops.registry import versions_table

    rows = versions_table(Workspace.open(args.workspace))
    print(json.dumps(rows, indent=1) if args.json else "\n".join(versions_lines(rows)))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from ctune_ops.registry import status

    state = status(Workspace.open(args.workspace))
    if args.json:
        print(json.dumps(state, indent=1))
        return 0
    print(f"current version: {state['current']}")
    last = state["last_day"]
    if last is None:
        print("last day: none recorded yet")
    else:
        outcome = (f"promoted {last['version']}" if last["outcome"] == "promote" else
                   f"kept {last['version']} (gate failed: {', '.join(last['failed']) or '-'})")
        funnel = last["funnel"]
        print(f"last day: {last['date']}: {outcome}; accepted {funnel['accepted']}, selected {funnel['selected']}, "
              f"training rows {funnel['training_rows']}")
        print("  " + ", ".join(f"{task} {score:.3f}" for task, score in sorted(last["metrics"].items())
                               if score is not None))
    if state["last_rollback"]:
        r = state["last_rollback"]
        print(f"last rollback: {r['from']} -> {r['version']} at {r['at']}")
    if state["interrupted"]:
        print(f"INTERRUPTED: {state['interrupted']}")
    return 0


def _local_airflow(args: argparse.Namespace):  # noqa: ANN202 - LocalAirflow, imported lazily
    from ctune_ops.airflow.local import LocalAirflow

    ws = Workspace.open(args.workspace)
    port = {"port": args.port} if getattr(args, "port", None) else {}
    return ws, LocalAirflow(ws.root, start_date=args.start or ws.config.world.start_date,
                            end_date=getattr(args, "end", None) or _last_world_day(ws), **port)


def _last_world_day(ws: Workspace) -> str | None:
    """The demo world's last generated day (the DAG schedules nothing after it); None outside the demo world."""
    from ctune_ops.world.generate import MANIFEST

    path = ws.world_dir / MANIFEST
    return json.loads(path.read_text(encoding="utf-8"))["dates"][-1] if path.exists() else None


def _cmd_airflow_setup(args: argparse.Namespace) -> int:
    ws, local = _local_airflow(args)
    local.setup()
    print(f"Airflow home {local.home}: metadata DB migrated, pool ctune_workspace (1 slot), Variable "
          f"ctune_workspace = {ws.root}")
    return 0


def _cmd_airflow_backfill(args: argparse.Namespace) -> int:
    _, local = _local_airflow(args)
    local.setup()
    with local.running():
        runs = local.backfill("ctune_daily", args.start, args.end, timeout_s=args.timeout,
                              progress=lambda run: print(f"  {run['logical_date'][:10]}: {run['state']}"))
    failed = [run for run in runs if run["state"] != "success"]
    print(f"{len(runs) - len(failed)} of {len(runs)} runs succeeded; logs in {local.home / 'logs'}")
    return 1 if failed else 0


def _cmd_airflow_standalone(args: argparse.Namespace) -> int:
    import os

    _, local = _local_airflow(args)
    local.setup()
    print(f"airflow standalone on {local.url} (user admin, password in "
          f"{local.home / 'simple_auth_manager_passwords.json.generated'}); Ctrl-C stops it")
    os.execvpe("airflow", ["airflow", "standalone"], local.env())
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from ctune_ops.experiment import run_experiment

    days = args.days or (SMALL_EXPERIMENT_DAYS if args.small else DEFAULT_EXPERIMENT_DAYS)
    result = run_experiment(Path(args.workspace), days=days, small=args.small, arms=tuple(args.arms),
                            progress=print)
    folder = Path(args.workspace) / "reports" / "experiment"
    print((folder / "results.md").read_text(encoding="utf-8"))
    print(f"results: {folder / 'results.json'}, {folder / 'results.md'}, plots: "
          f"{', '.join(Path(p).name for p in result['plots'])}; {result['wall_s']}s")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ctune_ops.demo import run_demo

    return run_demo(Path(args.workspace), days=args.days, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a git + DVC workspace (does nothing on an existing one)")
    p.add_argument("directory")
    p.set_defaults(func=_cmd_init)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("check", help="validate the workspace's params.yaml")
    p.add_argument("--workspace", default=".")
    p.set_defaults(func=_cmd_config_check)

    world = sub.add_parser("world", help="the demo world").add_subparsers(dest="world_command", required=True)
    p = world.add_parser("generate", help="write the knowledge base, daily batches, truth and eval tasks")
    p.add_argument("--workspace", default=".")
    p.add_argument("--days", type=int, required=True)
    p.add_argument("--seed", type=int, default=None, help="overrides world.seed")
    p.set_defaults(func=_cmd_world_generate)
    p = world.add_parser("bootstrap", help="train the tokenizer, base and proxy models on day 0")
    p.add_argument("--workspace", default=".")
    p.set_defaults(func=_cmd_world_bootstrap)
    p = world.add_parser("evaluate", help="score a model on the world's eval tasks with lm-eval")
    p.add_argument("--workspace", default=".")
    p.add_argument("--model", default="base", help="base, proxy, or a model folder")
    p.add_argument("--date", default=None, help="day whose target tasks to use (default: the last day)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.set_defaults(func=_cmd_world_evaluate)

    p = sub.add_parser("stage", help="run one pipeline stage for one batch date (as dvc.yaml does)")
    p.add_argument("name", help=f"one of: {', '.join(STAGE_NAMES)}")
    p.add_argument("--date", required=True, help="batch date, YYYY-MM-DD")
    p.add_argument("--workspace", default=".")
    p.add_argument("--no-lock", action="store_true",
                   help="do not take the workspace's file lock (flock is unreliable on network volumes; for a pod "
                        "whose Airflow pool already keeps other tasks off the workspace)")
    p.set_defaults(func=_cmd_stage)

    p = sub.add_parser("promote", help="version the day: promote its candidate or keep production, as the gate said")
    p.add_argument("--date", required=True, help="batch date, YYYY-MM-DD")
    p.add_argument("--workspace", default=".")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("rollback", help="make an earlier version production again (adapter, proxy, state/)")
    p.add_argument("version", help="a promoted version, e.g. v3 (see `ctune versions`)")
    p.add_argument("--workspace", default=".")
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("versions", help="the table of versions with their metrics")
    p.add_argument("--workspace", default=".")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_versions)

    p = sub.add_parser("status", help="the current version and the last day's outcome")
    p.add_argument("--workspace", default=".")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    airflow = sub.add_parser("airflow", help="Airflow on this machine for a workspace (SQLite, LocalExecutor)")
    airflow_sub = airflow.add_subparsers(dest="airflow_command", required=True)
    p = airflow_sub.add_parser("setup", help="migrate the metadata DB, create the pool and the workspace Variable")
    p.add_argument("--workspace", default=".")
    p.add_argument("--start", default=None, help="the DAG's start date (default: world.start_date)")
    p.set_defaults(func=_cmd_airflow_setup)
    p = airflow_sub.add_parser("backfill", help="run days through ctune_daily with a local scheduler, and wait")
    p.add_argument("--workspace", default=".")
    p.add_argument("--start", required=True, help="first batch date, YYYY-MM-DD")
    p.add_argument("--end", required=True, help="last batch date, YYYY-MM-DD")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the runs")
    p.set_defaults(func=_cmd_airflow_backfill)
    p = airflow_sub.add_parser("standalone", help="`airflow standalone` on the workspace (UI, scheduler, ...)")
    p.add_argument("--workspace", default=".")
    p.add_argument("--port", type=int, default=STANDALONE_PORT, help="the UI and API port")
    p.add_argument("--start", default=None, help="the DAG's start date (default: world.start_date)")
    p.set_defaults(func=_cmd_airflow_standalone)

    p = sub.add_parser("experiment", help="compute saved vs accuracy: ctune against all, static and random")
    p.add_argument("--workspace", default="experiment-workspace", help="base workspace (created; arms beside it)")
    p.add_argument("--days", type=int, default=None, help=f"default {DEFAULT_EXPERIMENT_DAYS} "
                                                          f"({SMALL_EXPERIMENT_DAYS} with --small)")
    p.add_argument("--small", action="store_true", help="the small world (CI)")
    p.add_argument("--arms", nargs="+", default=["ctune", "all", "static", "random"])
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("demo", help="the main job: a workspace with the demo world through the pipeline")
    p.add_argument("--workspace", default="demo-workspace")
    p.add_argument("--days", type=int, default=DEFAULT_DEMO_DAYS)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ConfigError, WorkspaceError, StageError, ValueError) as exc:
        print(f"ctune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``ctune``: one command per user task.

``ctune init DIR`` creates a workspace; ``ctune world generate|bootstrap|evaluate`` make and measure the demo
world; ``ctune demo`` runs the main job end to end; ``ctune config check`` validates params.yaml;
``ctune stage NAME --date D`` runs one pipeline stage for one day (what dvc.yaml and the operators call).
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
    result = run_stage(ws, args.name, args.date)
    print(json.dumps(result.summary, indent=1, sort_keys=True))
    for name, path in result.outputs.items():
        print(f"{name}: {path}")
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
    p.set_defaults(func=_cmd_stage)

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

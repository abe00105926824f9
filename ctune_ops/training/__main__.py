"""``python -m ctune_ops.training``: train one day's LoRA adapter from a spec file (or write the spec first).

Exit status 0 on success, 2 with one clear message for a bad spec, missing inputs or models, 1 with a traceback
for anything unexpected. The log goes to stderr; the last line on stdout is the report's summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ctune_ops.config import ConfigError
from ctune_ops.stages import StageError, check_date
from ctune_ops.training.data import TrainingDataError
from ctune_ops.training.spec import SpecError, TrainingError, read_spec, spec_for_day, spec_path, write_spec
from ctune_ops.workspace import Workspace, WorkspaceError

EXIT_USAGE = 2
SUMMARY_KEYS = ("date", "rows", "steps", "tokens_seen", "response_tokens", "first_loss", "final_loss", "wall_s",
                "device", "dtype", "resumed_from", "adapter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ctune_ops.training", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, help="the training spec (JSON) to run")
    parser.add_argument("--workspace", type=Path,
                        help="the workspace root (default: the spec's 'workspace'); with --date, required")
    parser.add_argument("--date", help="write day D's spec from the workspace's params.yaml, then train")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.spec is None) == (args.date is None):
        parser.error("give either --spec SPEC.json or --workspace ROOT --date D")
    if args.date is not None and args.workspace is None:
        parser.error("--date needs --workspace")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from ctune_ops.training.loop import run_training

    try:
        if args.date is not None:
            ws = Workspace.open(args.workspace)
            spec = spec_for_day(ws, check_date(args.date))
            path = write_spec(spec, spec_path(ws, spec.date))
            logging.getLogger(__name__).info("wrote %s", path)
            root = ws.root
        else:
            spec = read_spec(args.spec)
            root = (args.workspace or Path(spec.workspace)).resolve()
            if not root.is_dir():
                raise SpecError(f"workspace root {root} does not exist (spec field 'workspace', or --workspace)")
        report = run_training(spec, root)
    except (SpecError, TrainingDataError, TrainingError, ConfigError, WorkspaceError, StageError) as exc:
        print(f"ctune training: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps({key: report[key] for key in SUMMARY_KEYS}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Oracle bounds on the selection signal (issue 8): the headline experiment's ctune arm with the world's truth file
overriding the policy's ``known`` verdict on chosen rows, so that what a better knowledge signal could buy is
measured rather than argued.

    .venv/bin/python benchmarks/oracle_selection.py --workspace /tmp/expA                   # 7 days, every oracle
    .venv/bin/python benchmarks/oracle_selection.py --workspace /tmp/expA --oracles wrong   # one of them
    .venv/bin/python benchmarks/oracle_selection.py --workspace DIR --small                 # 2 days, small world (CI)
    .venv/bin/python benchmarks/oracle_selection.py --workspace /tmp/expA --params '{"train": {"seed": 1}}'

The workspace is the experiment's base (``ctune experiment --workspace DIR`` makes it; one is bootstrapped where
none exists). Each oracle trains, instead of dropping them as known, the rows the policy judged known that

* ``none``: -- none: the ctune arm itself, measured on the same machine as the others;
* ``wrong``: are about a fact the deployed model answers wrong when the day is selected (any of the fact's items of
  the previous day's ``ctune_target`` or of ``ctune_retention``): a perfect per-fact knowledge signal;
* ``earlier``: paraphrase a fact an earlier batch day introduced;
* ``known``: paraphrase a fact the base model was trained on.

Everything else is the ctune arm's: policy, replay, gate, repair, promotion. Each oracle runs in
``<workspace>-oracles/<name>``; the table gives training tokens (with the share of ``all``'s where the experiment's
``results.json`` has that arm), the final scores and the days the gate kept; ``<workspace>/reports/experiment/
oracles.json`` holds every day.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ctune_ops.experiment import (  # noqa: E402
    arm_workspace,
    final_target_by_fact_day,
    prepare_base,
    run_day,
    set_params,
)
from ctune_ops.records import read_jsonl  # noqa: E402
from ctune_ops.selection.policy import KNOWN, SELECTED  # noqa: E402
from ctune_ops.stages.evaluate import production_adapter  # noqa: E402
from ctune_ops.workspace import Workspace  # noqa: E402
from ctune_ops.world import evalsets  # noqa: E402
from ctune_ops.world.measure import task_items  # noqa: E402
from ctune_ops.world.selection_truth import day_truth  # noqa: E402

ORACLES = ("none", "wrong", "earlier", "known")
PARAPHRASE_KINDS = ("known", "earlier")  # the truth file's kinds of the rows a proxy may judge known


def wrong_facts(ws: Workspace, dates: list[str], date: str) -> set[str]:
    """Facts the deployed model answers wrong on at least one item before ``date`` is trained: the retention task,
    and the target task of the day before (the facts introduced up to then)."""
    adapter = production_adapter(ws)  # None (none promoted): the base
    tasks = [evalsets.retention_dir(ws.eval_dir) / f"{evalsets.RETENTION_TASK}.yaml"]
    earlier = dates[: dates.index(date)]
    if earlier:
        tasks.append(evalsets.day_dir(ws.eval_dir, earlier[-1]) / f"{evalsets.TARGET_TASK}.yaml")
    wrong: set[str] = set()
    for task in tasks:
        wrong |= {doc["fact_id"] for doc, value in task_items(ws, adapter, task) if value < 1}
    return wrong


def oracle_rows(ws: Workspace, dates: list[str], date: str, oracle: str) -> set[str]:
    """Ids of the day's rows the oracle trains should the policy judge them known."""
    if oracle == "none":
        return set()
    truth = day_truth(ws, date)
    if oracle in PARAPHRASE_KINDS:
        return {row_id for row_id, t in truth.items() if t["kind"] == oracle}
    wrong = wrong_facts(ws, dates, date)
    return {row_id for row_id, t in truth.items() if t["kind"] in PARAPHRASE_KINDS and t.get("fact_id") in wrong}


@contextmanager
def trained_instead_of_known(rows: set[str]) -> Iterator[list[str]]:
    """The select stage as it is, but for the policy's ``known`` verdicts on ``rows``, which become ``selected``
    (so the replay, the history and the reports treat them as any selected row). Yields the ids turned, filled in
    when the stage runs."""
    from ctune_ops.stages import select

    real_run, real_decide = select.run, select.decide
    order: list[str] = []  # the policy's rows in its order: the dedup stage's unique rows
    turned: list[str] = []

    def run(ws: Workspace, date: str) -> Any:
        order[:] = [str(r["id"]) for r in read_jsonl(ws.unique(date))]
        return real_run(ws, date)

    def decide(*args: Any, **kwargs: Any) -> Any:
        result = real_decide(*args, **kwargs)
        flip = [k for k, d in enumerate(result.decisions) if d == KNOWN and order[k] in rows]
        for k in flip:
            result.decisions[k] = SELECTED
        turned[:] = [order[k] for k in flip]
        return result

    with patch.object(select, "run", run), patch.object(select, "decide", decide):
        yield turned


def run_oracle(base: Workspace, dates: list[str], oracle: str, root: Path,
               params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ctune arm from ``base`` (``params`` merged into its params.yaml) with ``oracle``'s rows trained, every
    day; what each day did and the end."""
    ws = arm_workspace(base, "ctune", root)
    if params:
        ws = set_params(ws, params)
    days = []
    for date in dates:
        rows = oracle_rows(ws, dates, date, oracle)
        with trained_instead_of_known(rows) as turned:
            day = run_day(ws, "ctune", date)
        days.append({**day, "oracle_rows": len(rows), "turned": sorted(turned)})
        print(f"  {oracle:<8}{date}: {day['decision']:<8}{day['version']:<5} selected {day['selected']:>4} "
              f"({len(turned)} turned), train tokens {day['tokens']['train']:>7}, "
              + ", ".join(f"{t} {v:.3f}" for t, v in sorted(day["production"].items())), flush=True)
    return {**summary(oracle, days, sum(len(d["turned"]) for d in days)),
            "final_target_by_fact_day": final_target_by_fact_day(ws, dates[-1])}


def summary(name: str, days: list[dict[str, Any]], turned: int | str) -> dict[str, Any]:
    """What the table shows of an arm, from its days (:func:`ctune_ops.experiment.run_day`'s rows)."""
    return {"oracle": name, "days": days, "train_tokens": sum(d["tokens"]["train"] for d in days),
            "turned": turned, "final": days[-1]["production"],
            "kept_days": [d["date"] for d in days if d["decision"] != "promote"],
            "repaired_days": [d["date"] for d in days if d["repaired"]]}


def all_arm(root: Path) -> dict[str, Any] | None:
    """The ``all`` arm of the experiment run on this base, as :func:`run_oracle` reports an oracle; None if it was
    not run."""
    path = root / "reports" / "experiment" / "results.json"
    if not path.exists():
        return None
    days = [r for r in json.loads(path.read_text(encoding="utf-8"))["rows"] if r["arm"] == "all"]
    return summary("(all arm)", days, "") if days else None


def table(results: list[dict[str, Any]], every: dict[str, Any] | None) -> str:
    """One line per oracle (and the all arm): the final scores, and the target's mean over the days, which one
    day's 20 new items sway less."""
    lines = ["| oracle | rows turned | training tokens | share of all's | final ctune_retention | final ctune_target "
             "| ctune_target, mean of the days | kept days | repaired days |", "|---|---|---|---|---|---|---|---|---|"]
    for r in [*results, *([every] if every else [])]:
        share = f"{r['train_tokens'] / every['train_tokens']:.3f}" if every else ""
        mean = sum(d["production"]["ctune_target"] for d in r["days"]) / len(r["days"])
        lines.append(f"| {r['oracle']} | {r['turned']} | {r['train_tokens']:,} | {share} | "
                     f"{r['final']['ctune_retention']:.3f} | {r['final']['ctune_target']:.3f} | {mean:.3f} | "
                     f"{len(r['kept_days'])} | {len(r['repaired_days'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("experiment-workspace"),
                        help="the experiment's base workspace (bootstrapped here where missing)")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--small", action="store_true", help="2 days of the small world (CI): a smoke test")
    parser.add_argument("--oracles", nargs="+", choices=ORACLES, default=list(ORACLES))
    parser.add_argument("--params", type=json.loads, default={},
                        help='a JSON object merged into every oracle\'s params.yaml, e.g. \'{"train": {"seed": 1}, '
                             '"select": {"seed": 1}}\' (the all arm\'s line is read as the experiment ran it)')
    args = parser.parse_args(argv)
    days = 2 if args.small else args.days
    base, dates = prepare_base(args.workspace, days, args.small, print)
    folder = args.workspace.parent / f"{args.workspace.name}-oracles"
    results = [run_oracle(base, dates, oracle, folder / oracle, args.params) for oracle in args.oracles]
    every = all_arm(args.workspace)
    out = args.workspace / "reports" / "experiment" / "oracles.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"days": dates, "small": args.small, "params": args.params, "oracles": results},
                              indent=1) + "\n",
                   encoding="utf-8")
    print(table(results, every))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How well the dedup and select stages did on a demo-world day, judged against the world's hidden truth.

The pipeline never reads ``world/truth``; benchmarks and tests do, through this module. For the accepted rows
of a day: precision and recall of the dedup drops on the injected duplicates, which share of the rows about known
facts was dropped and of the rows about new facts kept, and precision and recall of dropping every redundant row
(known facts, earlier days' facts, duplicates).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ctune_ops.records import read_jsonl
from ctune_ops.workspace import Workspace

DEDUP_DECISIONS = ("exact_duplicate", "near_duplicate")
REDUNDANT_KINDS = ("known", "earlier", "duplicate")  # rows the deployed model gains nothing from: drop them


def day_truth(ws: Workspace, date: str) -> dict[str, dict[str, Any]]:
    """Row id -> truth entry of the day."""
    return {t["id"]: t for t in read_jsonl(ws.world_dir / "truth" / f"{date}.jsonl")}


def selection_quality(ws: Workspace, date: str) -> dict[str, Any]:
    """Counts and rates of one day whose dedup and select stages have run."""
    import pyarrow.parquet as pq

    truth = day_truth(ws, date)
    table = pq.read_table(ws.reports(date) / "decisions.parquet").to_pydict()
    decided = dict(zip(table["id"], table["decision"], strict=True))
    duplicate_of = dict(zip(table["id"], table["duplicate_of"], strict=True))
    kinds = Counter()
    outcome: Counter[tuple[str, str]] = Counter()
    true_dup = flagged = hit = right_target = 0
    for row_id, decision in decided.items():
        kind = truth[row_id]["kind"]
        kinds[kind] += 1
        outcome[(kind, decision)] += 1
        is_dup, dropped = kind == "duplicate", decision in DEDUP_DECISIONS
        true_dup += is_dup
        flagged += dropped
        if is_dup and dropped:
            hit += 1
            right_target += duplicate_of[row_id] == truth[row_id].get("duplicate_of")
    known, new = kinds["known"], kinds["new"]
    redundant = sum(kinds[k] for k in REDUNDANT_KINDS)
    dropped = sum(n for (k, d), n in outcome.items() if d != "selected")
    redundant_dropped = sum(n for (k, d), n in outcome.items() if d != "selected" and k in REDUNDANT_KINDS)
    selected = sum(n for (k, d), n in outcome.items() if d == "selected")
    return {
        "date": date,
        "accepted_by_kind": dict(sorted(kinds.items())),
        "dedup_precision": hit / flagged if flagged else 1.0,
        "dedup_recall": hit / true_dup if true_dup else 1.0,
        "dedup_named_original": right_target / hit if hit else 1.0,
        "known_dropped": (known - outcome[("known", "selected")]) / known if known else None,
        "new_kept": outcome[("new", "selected")] / new if new else None,
        "earlier_kept": outcome[("earlier", "selected")] / kinds["earlier"] if kinds["earlier"] else None,
        "earlier_dropped": 1 - outcome[("earlier", "selected")] / kinds["earlier"] if kinds["earlier"] else None,
        "redundant_drop_precision": redundant_dropped / dropped if dropped else None,
        "redundant_drop_recall": redundant_dropped / redundant if redundant else None,
        "new_keep_precision": outcome[("new", "selected")] / selected if selected else None,
        "outcomes": {f"{k}->{d}": n for (k, d), n in sorted(outcome.items())},
    }

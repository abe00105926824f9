"""The continual-stream experiment (issue 8): compute saved against accuracy kept, ctune against three baselines.

The demo world's stream is replayed for D days through the stages (library calls, no Airflow), once per arm, from
the same bootstrapped workspace with the same seeds and hyperparameters:

* ``all``    -- no redundancy filter: validation and exact dedup only, every unique row selected;
* ``static`` -- ctune's policy with the day-0 proxy never updated (static data selection);
* ``ctune``  -- the full pipeline, the proxy updated in step with the deployed model;
* ``random`` -- as many random rows per day as ``ctune`` selected that day.

Every arm runs the same gate, repair and promotion, as a deployment would. Per arm and day it records training
tokens (the repair's rehearsal included), the wall time of scoring and of training, the production model's
``ctune_retention`` and ``ctune_target`` accuracy after the day (lm-eval, from the deciding gate's report), and,
from the world's truth, precision and recall of dropping redundant rows and of keeping new facts. Compute is
estimated in FLOPs from parameter counts and tokens (below), for the demo's sizes and for a 7B deployed model
with a 0.5B proxy.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ctune_ops.workspace import Workspace

ARMS: dict[str, dict[str, Any]] = {
    "ctune": {},
    "all": {"select": {"strategy": "all"}, "dedup": {"near_dup_threshold": 1.0}, "proxy": {"update": False}},
    "static": {"proxy": {"update": False}},
    "random": {"select": {"strategy": "random", "random_rows": 0}},  # random_rows: ctune's count, per day
}
ARM_ORDER = ("ctune", "all", "static", "random")  # ctune first: random draws as many rows as ctune selected
STAGES = ("validate", "dedup", "score", "select", "train", "proxy", "evaluate", "repair")
# FLOPs per token: a forward pass costs 2N; training 6N (forward, backward through activations and weights).
# LoRA training of the deployed model freezes the base, whose weight gradients are never formed: 4N.
FORWARD_FLOPS, FULL_TRAIN_FLOPS, LORA_TRAIN_FLOPS = 2, 6, 4
LARGE_SCENARIO = {"deployed_parameters": 7e9, "proxy_parameters": 0.5e9}
SCORE_PASSES = 2  # L_cond over prompt + output, L_out over the output (an upper bound: L_out is cached)
PROGRESS = Callable[[str], None]


def set_params(ws: Workspace, updates: dict[str, Any]) -> Workspace:
    """Deep-merge ``updates`` into the workspace's params.yaml and commit it (the arm's configuration)."""
    path = ws.root / "params.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(data, updates)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    ws.commit("experiment: arm parameters", ["params.yaml"])
    return ws.reload()


def _scoring_tokens(ws: Workspace, date: str) -> int:
    """Tokens the proxy read to score the day: every unique row and the calibration sample, both passes."""
    import pyarrow.parquet as pq

    from ctune_ops.stages.score import calibration_path

    total = 0
    for path in (ws.scored(date), calibration_path(ws, date)):
        table = pq.read_table(path).to_pydict()
        total += sum(table["prompt_tokens"]) + SCORE_PASSES * sum(table["output_tokens"])
    return total


def _proxy_tokens(train: dict[str, Any], proxy: dict[str, Any]) -> int:
    """Tokens the proxy update read: as its report counts them, or (a report from before it did) the deployed
    model's training set less the rehearsal pass, for the proxy's epochs."""
    fit = proxy.get("training")
    if not fit or not train.get("epochs"):
        return 0  # static arm: no update
    if "tokens_seen" in fit:
        return int(fit["tokens_seen"])
    rehearsal = train.get("rehearsal") or {}
    rehearsed = rehearsal.get("tokens_seen", 0)  # the proxy skips the rehearsal pass
    return round((train["tokens_seen"] - rehearsed) / train["epochs"] * fit["epochs"])


def parameter_counts(ws: Workspace) -> dict[str, int]:
    """Parameters of the deployed model's base and of the proxy (from their safetensors headers)."""
    from safetensors import safe_open

    counts = {}
    for key, spec in (("deployed_parameters", ws.config.models.base),
                      ("proxy_parameters", ws.config.models.proxy_base)):
        total = 0
        for file in sorted(Path(ws.model_path(spec)).glob("*.safetensors")):
            with safe_open(str(file), "pt") as tensors:
                total += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118
        counts[key] = total
    return counts


def flops(tokens: dict[str, int], sizes: dict[str, float]) -> dict[str, float]:
    """FLOPs of one day: LoRA training of the deployed model (with production's forward pass over distilled replay
    rows), proxy scoring, proxy update."""
    train = (LORA_TRAIN_FLOPS * tokens["train"] + FORWARD_FLOPS * tokens.get("teacher", 0)) \
        * sizes["deployed_parameters"]
    score = FORWARD_FLOPS * sizes["proxy_parameters"] * tokens["score"]
    proxy = FULL_TRAIN_FLOPS * sizes["proxy_parameters"] * tokens["proxy_update"]
    return {"train": train, "score": score, "proxy_update": proxy, "total": train + score + proxy}


def _repaired(row: dict[str, Any]) -> str:
    """The table's repair marker: ``(repaired)``, ``(repaired, 2 rounds)`` or nothing."""
    if not row["repaired"]:
        return ""
    rounds = row.get("repair_rounds", 1)
    return " (repaired)" if rounds <= 1 else f" (repaired, {rounds} rounds)"


def run_day(ws: Workspace, arm: str, date: str) -> dict[str, Any]:
    """One day of one arm through every stage and promote; what it cost and what it did."""
    from ctune_ops.registry import promote
    from ctune_ops.stages import run_stage
    from ctune_ops.stages.repair import REPORT_FILE as REPAIR_FILE
    from ctune_ops.stages.repair import deciding_report
    from ctune_ops.world.selection_truth import selection_quality

    walls: dict[str, float] = {}
    for stage in STAGES:
        started = time.perf_counter()
        run_stage(ws, stage, date)
        walls[stage] = round(time.perf_counter() - started, 2)
    outcome = promote(ws, date)
    train, proxy, selection, repair = (ws.report(date, n) for n in ("train.json", "proxy.json", "selection.json",
                                                                      REPAIR_FILE))
    rehearsed = (repair.get("rehearsed") or {}).get("train", {})  # every round of the repair, summed
    evaluation = deciding_report(ws, date)
    side = "candidate" if outcome.decision == "promote" else "production"
    metric = evaluation["rule"]["metric"]
    scores = {task: s.get(metric) for task, s in evaluation[side]["scores"].items()}
    quality = selection_quality(ws, date)
    return {
        "arm": arm, "date": date, "decision": outcome.decision, "version": outcome.version,
        "selected": selection["funnel"]["selected"], "training_rows": selection["funnel"]["training_rows"],
        "unique": selection["funnel"]["unique"],
        "repaired": bool(repair.get("attempted")),
        "repair_rounds": len((repair.get("rehearsed") or {}).get("rounds", [])),
        "tokens": {"train": train.get("tokens_seen", 0) + rehearsed.get("tokens_seen", 0),
                   "score": _scoring_tokens(ws, date),
                   "proxy_update": _proxy_tokens(train, proxy),
                   # the deployed model's forward passes that teach: over distilled replay rows in training, over
                   # the day's new rows for a distilling proxy update
                   "teacher": train.get("teacher_tokens", 0) + (proxy.get("training") or {}).get("teacher_tokens", 0)},
        "wall_s": {"score": walls["score"], "train": walls["train"], "proxy": walls["proxy"],
                   "evaluate": walls["evaluate"], "repair": walls["repair"]},
        "production": scores,
        "quality": {key: quality[key] for key in (
            "redundant_drop_precision", "redundant_drop_recall", "known_dropped", "earlier_dropped",
            "dedup_recall", "new_kept", "new_keep_precision")},
    }


SMALL_LORA_RANK = 32
SMALL_PARAMS: dict[str, Any] = {  # the test suite's small world: a base a third as wide, LoRA on four projections
    "world": {"rows_per_day": 100},
    "bootstrap": {
        "base": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 352, "epochs": 4,
                 "learning_rate": 0.004, "tie_embeddings": True},
        "proxy": {"hidden_size": 64, "num_layers": 2, "intermediate_size": 176, "epochs": 5},
    },
    # the rank the small base was tuned at (the demo's default, train.lora in params.yaml, is for its 3x wider base)
    "train": {"lora": {"rank": SMALL_LORA_RANK, "alpha": 2.0 * SMALL_LORA_RANK,
                       "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}},
}


def prepare_base(root: Path, days: int, small: bool, progress: PROGRESS) -> tuple[Workspace, list[str]]:
    """A workspace with the world's first ``days`` days and bootstrapped models, on which no day has run yet."""
    from ctune_ops.workspace import init_workspace
    from ctune_ops.world.bootstrap import bootstrap_models
    from ctune_ops.world.generate import generate_world

    result = init_workspace(root)
    ws = result.workspace
    if result.created and small:
        ws = set_params(ws, SMALL_PARAMS)
    if (ws.root / "registry.json").exists():
        raise ValueError(f"{ws.root} has versioned days already; the experiment needs a workspace where none ran")
    dates = generate_world(ws, days=days).dates
    if not (ws.root / "reports" / "bootstrap.json").exists():
        progress("bootstrapping the base and proxy models on day 0 ...")
        bootstrap_models(ws, progress=lambda msg: None)
    return ws.reload(), dates


def arm_workspace(base: Workspace, arm: str, root: Path) -> Workspace:
    """A fresh copy of the base workspace at ``root`` with the arm's parameters (nothing run on it yet)."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base.root, root, symlinks=True, ignore=shutil.ignore_patterns(".airflow"))
    return set_params(Workspace.open(root), ARMS[arm])


def run_arm(base: Workspace, arm: str, dates: list[str], arms_dir: Path, ctune_counts: dict[str, int],
            progress: PROGRESS) -> list[dict[str, Any]]:
    """A copy of the base workspace with the arm's parameters, every day through the pipeline."""
    ws = arm_workspace(base, arm, arms_dir / arm)
    rows = []
    for date in dates:
        if arm == "random":
            ws = set_params(ws, {"select": {"random_rows": ctune_counts[date]}})
        row = run_day(ws, arm, date)
        rows.append(row)
        if arm == "ctune":
            ctune_counts[date] = row["selected"]
        progress(f"  {arm:<7}{date}: {row['decision']:<8}{row['version']:<5} selected {row['selected']:>4} of "
                 f"{row['unique']:>4}, train tokens {row['tokens']['train']:>7}, "
                 + ", ".join(f"{t} {v:.3f}" for t, v in sorted(row["production"].items()))
                 + f"; drop recall {row['quality']['redundant_drop_recall']:.2f}")
    return rows


def summarise(rows: list[dict[str, Any]], sizes: dict[str, int], dates: list[str]) -> dict[str, Any]:
    """Totals per arm, compute for both model sizes, and the issue's targets with their measured values."""
    arms = sorted({r["arm"] for r in rows}, key=ARM_ORDER.index)
    per_arm: dict[str, Any] = {}
    for arm in arms:
        own = [r for r in rows if r["arm"] == arm]
        tokens = {k: sum(_charged_tokens(r).get(k, 0) for r in own)
                  for k in ("train", "teacher", "score", "proxy_update")}
        per_arm[arm] = {
            "tokens": tokens,
            "flops_demo": flops(tokens, sizes),
            "flops_7b_0.5b": flops(tokens, LARGE_SCENARIO),
            "wall_s": {k: round(sum(r["wall_s"][k] for r in own), 1) for k in ("score", "train", "proxy")},
            "final": own[-1]["production"],
            "versions": [r["version"] for r in own if r["decision"] == "promote"],
            "earlier_dropped_from_day2": _mean([r["quality"]["earlier_dropped"] for r in own[1:]]),
        }
    targets = {}
    if {"ctune", "all"} <= set(per_arm):
        c, a = per_arm["ctune"], per_arm["all"]
        targets["train_tokens_share"] = {"value": _ratio(c["tokens"]["train"], a["tokens"]["train"]),
                                         "target": "<= 0.333"}
        targets["flops_share_7b_0.5b"] = {"value": _ratio(c["flops_7b_0.5b"]["total"], a["flops_7b_0.5b"]["total"]),
                                          "target": "<= 0.40"}
        targets["flops_share_demo"] = {"value": _ratio(c["flops_demo"]["total"], a["flops_demo"]["total"]),
                                       "target": "reported"}
        for task in ("ctune_target", "ctune_retention"):
            targets[f"final_{task}_vs_all"] = {"value": round(c["final"][task] - a["final"][task], 4),
                                               "target": ">= -0.02"}
    if {"ctune", "static"} <= set(per_arm) and len(dates) > 1:
        targets["earlier_drop_recall_vs_static"] = {
            "value": round(per_arm["ctune"]["earlier_dropped_from_day2"]
                           - per_arm["static"]["earlier_dropped_from_day2"], 4), "target": ">= 0.20"}
    if {"ctune", "random"} <= set(per_arm):
        targets["final_ctune_target_vs_random"] = {
            "value": round(per_arm["ctune"]["final"]["ctune_target"] - per_arm["random"]["final"]["ctune_target"],
                           4), "target": ">= 0.05"}
    for target in targets.values():
        target["met"] = _met(target["value"], target["target"])
    return {"arms": per_arm, "targets": targets, "parameters": sizes}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def _met(value: float | None, target: str) -> bool | None:
    if value is None or target == "reported":
        return None
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = ["| arm | date | decision | selected / unique | train tokens | score s | train s | ctune_retention | "
             "ctune_target | redundant drop P / R | earlier dropped | new kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quality"]
        lines.append(
            f"| {r['arm']} | {r['date']} | {r['decision']} {r['version']}{_repaired(r)} | "
            f"{r['selected']} / {r['unique']} | "
            f"{r['tokens']['train']} | {r['wall_s']['score']} | {r['wall_s']['train']} | "
            f"{r['production'].get('ctune_retention', float('nan')):.3f} | "
            f"{r['production'].get('ctune_target', float('nan')):.3f} | "
            f"{_fmt(q['redundant_drop_precision'])} / {_fmt(q['redundant_drop_recall'])} | "
            f"{_fmt(q['earlier_dropped'])} | {_fmt(q['new_kept'])} |")
    lines += ["", "| arm | train tokens | FLOPs (demo sizes) | FLOPs (7B + 0.5B proxy) | final ctune_retention | "
              "final ctune_target | versions |", "|---|---|---|---|---|---|---|"]
    for arm, a in summary["arms"].items():
        lines.append(f"| {arm} | {a['tokens']['train']} | {a['flops_demo']['total']:.3g} | "
                     f"{a['flops_7b_0.5b']['total']:.3g} | {a['final'].get('ctune_retention', float('nan')):.3f} | "
                     f"{a['final'].get('ctune_target', float('nan')):.3f} | {' '.join(a['versions']) or '-'} |")
    lines += ["", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, t in summary["targets"].items():
        lines.append(f"| {name} | {t['value']} | {t['target']} | {t['met']} |")
    by_day = summary.get("final_target_by_fact_day") or {}
    days = sorted({day for counts in by_day.values() for day in counts})
    if days:
        lines += ["", "final ctune_target items right, by the day their facts were introduced:", "",
                  "| arm | " + " | ".join(days) + " |", "|---|" + "---|" * len(days)]
        for arm, counts in by_day.items():
            lines.append(f"| {arm} | " + " | ".join(
                f"{counts[d]['right']} / {counts[d]['items']}" if d in counts else "-" for d in days) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plots(rows: list[dict[str, Any]], summary: dict[str, Any], folder: Path) -> list[Path]:
    """tokens per day, cumulative compute, accuracy per day, one line per arm (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    arms = list(summary["arms"])
    charts = (
        ("tokens_per_day.png", "training tokens per day", lambda rs: [r["tokens"]["train"] for r in rs]),
        ("cumulative_compute.png", "cumulative FLOPs (7B deployed + 0.5B proxy)",
         lambda rs: _cumulative([flops(_charged_tokens(r), LARGE_SCENARIO)["total"] for r in rs])),
        ("accuracy_target.png", "ctune_target after each day", lambda rs: [r["production"]["ctune_target"]
                                                                          for r in rs]),
        ("accuracy_retention.png", "ctune_retention after each day",
         lambda rs: [r["production"]["ctune_retention"] for r in rs]),
    )
    for name, title, values in charts:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for arm in arms:
            own = [r for r in rows if r["arm"] == arm]
            ax.plot([r["date"][5:] for r in own], values(own), marker="o", label=arm)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append(folder / name)
    return written


def _charged_tokens(row: dict[str, Any]) -> dict[str, int]:
    """The tokens an arm pays for: ``all`` needs no proxy, so its scoring and proxy updates cost nothing."""
    return {**row["tokens"], "score": 0, "proxy_update": 0} if row["arm"] == "all" else row["tokens"]


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def final_target_by_fact_day(ws: Workspace, date: str) -> dict[str, dict[str, int]]:
    """The arm's production model after its last day: its ctune_target items right, by the day each fact came
    (facts never learned on their day against facts lost later; :func:`ctune_ops.world.measure.target_by_fact_day`).
    """
    from ctune_ops.stages.evaluate import production_adapter
    from ctune_ops.world.measure import target_by_fact_day

    return target_by_fact_day(ws, production_adapter(ws), date)  # no adapter (none promoted): the base


def run_experiment(root: Path, days: int, small: bool = False, arms: tuple[str, ...] = ARM_ORDER,
                   progress: PROGRESS = print) -> dict[str, Any]:
    """The whole experiment; results in ``<root>/reports/experiment/`` (JSON, markdown, PNG)."""
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; the arms are {', '.join(ARM_ORDER)}")
    if "random" in arms and "ctune" not in arms:
        raise ValueError("the random arm draws as many rows as ctune selected: run ctune too")
    started = time.perf_counter()
    base, dates = prepare_base(root, days, small, progress)
    sizes = parameter_counts(base)
    arms_dir = root.parent / f"{root.name}-arms"
    counts: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    by_fact_day: dict[str, dict[str, dict[str, int]]] = {}
    for arm in sorted(arms, key=ARM_ORDER.index):
        arm_started = time.perf_counter()
        rows += run_arm(base, arm, dates, arms_dir, counts, progress)
        by_fact_day[arm] = final_target_by_fact_day(Workspace.open(arms_dir / arm), dates[-1])
        progress(f"  {arm} took {time.perf_counter() - arm_started:.0f}s")
    summary = {**summarise(rows, sizes, dates), "final_target_by_fact_day": by_fact_day}
    folder = root / "reports" / "experiment"
    folder.mkdir(parents=True, exist_ok=True)
    result = {"days": dates, "small": small, "rows": rows, **summary,
              "wall_s": round(time.perf_counter() - started, 1),
              "flops_model": {"lora_train_per_token": f"{LORA_TRAIN_FLOPS}N", "forward_per_token":
                              f"{FORWARD_FLOPS}N", "full_train_per_token": f"{FULL_TRAIN_FLOPS}N",
                              "score_passes": SCORE_PASSES}}
    (folder / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (folder / "results.md").write_text(markdown(rows, summary), encoding="utf-8")
    result["plots"] = [str(p) for p in plots(rows, summary, folder)]
    return result

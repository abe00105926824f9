"""``ctune world generate``: write the demo world into a workspace and commit it.

Writes ``world/knowledge.json``, the day-0 corpus ``world/corpus/day0.jsonl`` (what the base model is pretrained
on), ``incoming/D/part-*.jsonl`` for each day, the truth ``world/truth/D.jsonl`` and the eval tasks under ``eval/``.
Same seed, same bytes; asking for more days later appends days without changing the earlier ones.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctune_ops.config import CtuneConfig
from ctune_ops.records import write_jsonl
from ctune_ops.workspace import Workspace, WorkspaceError, atomic_write_bytes, atomic_write_text
from ctune_ops.world import evalsets
from ctune_ops.world.knowledge import KnowledgeBase, build_knowledge, render
from ctune_ops.world.stream import StreamGenerator
from ctune_ops.world.templates import check_families

MANIFEST = "manifest.json"


def corpus_rows(kb: KnowledgeBase, config: CtuneConfig) -> list[dict[str, Any]]:
    """Day-0 corpus: every known fact in every pairing of its training question and answer wordings.

    Why every pairing: a model that saw each question with one fixed answer wording memorises the pairing, so its
    perplexity on the rows it was trained on (~1.0) says nothing about its perplexity on a known fact asked in
    another wording (where which answer wording comes is genuinely uncertain). Trained on every pairing, the base
    model and the proxy know the fact, not the string, and the rows trained into production carry the same wording
    uncertainty as tomorrow's paraphrases -- which is what calibrating tau_known on trained rows assumes."""
    world = config.world
    rows = []
    for fact in kb.known:
        questions, answers = fact.wordings("train", world)
        for j, question in enumerate(questions):
            for k, answer in enumerate(answers):
                rows.append({"id": f"day0-{fact.id}-{j}-{k}", **render(fact, question, answer), "fact_id": fact.id})
    return rows


@dataclass(frozen=True)
class GenerateResult:
    dates: list[str]
    counts: dict[str, dict[str, int]]
    committed: bool


def _check_manifest(path: Path, seed: int, config: CtuneConfig) -> None:
    if not path.exists():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    if previous["seed"] != seed or previous["world"] != config.world.model_dump(exclude={"seed"}):
        raise WorkspaceError(
            f"{path}: this workspace already holds a world generated with seed {previous['seed']} and other "
            "world settings; incoming data is never rewritten, so generate into a new workspace"
        )


def generate_world(ws: Workspace, days: int, seed: int | None = None, commit: bool = True) -> GenerateResult:
    """Generate days ``1..days`` of the world (``seed`` overrides ``world.seed``) and commit them."""
    check_families()
    config = ws.config
    if seed is not None:
        config = config.model_copy(update={"world": config.world.model_copy(update={"seed": seed})})
    world = config.world
    manifest_path = ws.world_dir / MANIFEST
    _check_manifest(manifest_path, world.seed, config)
    kb = build_knowledge(world)
    dates = world.day_dates(days)
    atomic_write_text(ws.world_dir / "knowledge.json", json.dumps(kb.to_json(), indent=1, ensure_ascii=False) + "\n")
    write_jsonl(ws.world_dir / "corpus" / "day0.jsonl", corpus_rows(kb, config))
    evalsets.write_task(evalsets.retention_dir(ws.eval_dir), evalsets.RETENTION_TASK,
                        evalsets.eval_items(kb, kb.known, config))

    stream = StreamGenerator(world, kb, dates)
    introduced: list = []
    counts: dict[str, dict[str, int]] = {}
    for date in dates:
        batch = stream.next_day()
        folder = ws.incoming(date)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in batch.files.items():
            atomic_write_bytes(folder / name, data)
        write_jsonl(ws.world_dir / "truth" / f"{date}.jsonl", batch.truth)
        today = [kb.facts[fact_id] for fact_id in batch.new_facts]
        introduced += today
        day_folder = evalsets.day_dir(ws.eval_dir, date)
        evalsets.write_task(day_folder, evalsets.TARGET_TASK, evalsets.eval_items(kb, introduced, config))
        evalsets.write_task(day_folder, evalsets.NEW_TASK, evalsets.eval_items(kb, today, config))
        counts[date] = dict(sorted(Counter(row["kind"] for row in batch.truth).items()))

    manifest = {
        "seed": world.seed, "days": len(dates), "dates": dates, "counts": counts,
        "world": world.model_dump(exclude={"seed"}),
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    committed = False
    if commit:
        with ws.lock(purpose="world generate"):
            tracked = ws.dvc_add(["incoming"])
            committed = ws.commit(
                f"world: {len(dates)} days of the demo stream, seed {world.seed}",
                [*tracked, "world", "eval"],
            )
    return GenerateResult(dates, counts, committed)

"""A poisoned batch: rows that contradict facts the base model knows, for testing the eval gate.

Each chosen known fact appears in every pairing of its reappearance questions with its training answers, with the
answer's object swapped for one of the fact's eval distractors (a plausible wrong object of the same type). None of
these rows is known to the model and none is a duplicate, so selection keeps them; a candidate trained on them
unlearns those facts, and the gate must reject it on ``ctune_retention``. The truth goes to
``world/truth/<date>.poisoned.jsonl``, beside (never over) the day's own truth.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from ctune_ops.records import write_jsonl
from ctune_ops.workspace import Workspace
from ctune_ops.world.evalsets import distractors
from ctune_ops.world.knowledge import build_knowledge, render

POISON_FILE = "poisoned.jsonl"
POISON_SOURCE = "poisoned"


def write_poisoned_day(ws: Workspace, date: str, facts: int, seed: int = 0) -> Path:
    """Write ``incoming/<date>/poisoned.jsonl`` contradicting ``facts`` known facts; returns the file."""
    world = ws.config.world
    kb = build_knowledge(world)
    known = kb.known
    if not 0 < facts <= len(known):
        raise ValueError(f"facts must be between 1 and the world's {len(known)} known facts, not {facts}")
    rng = random.Random(f"{seed}:{date}:poison")
    rows, truth = [], []
    for fact in sorted(rng.sample(known, facts), key=lambda f: f.id):
        wrong = distractors(kb, fact, rng)[0]
        questions, _ = fact.wordings("reappear", world)
        _, answers = fact.wordings("train", world)
        for question in questions:
            for answer in answers:
                row_id = f"poison-{date}-{len(rows) + 1:04d}"
                rows.append({"id": row_id, **render(replace(fact, object=wrong), question, answer),
                             "source": POISON_SOURCE})
                truth.append({"id": row_id, "kind": "poisoned", "fact": fact.id, "true_object": fact.object,
                              "wrong_object": wrong})
    path = ws.incoming(date) / POISON_FILE
    write_jsonl(path, rows)
    write_jsonl(ws.world_dir / "truth" / f"{date}.poisoned.jsonl", truth)
    return path

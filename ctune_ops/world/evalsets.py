"""Multiple-choice eval items for the demo world's facts, written as lm-eval 0.4 task YAMLs with their JSONL.

An item is the prompt of one of the fact's held-out question wordings followed by the prefix of a held-out answer
wording; the four choices are the true object and three distractors of the same type and familiarity that are not
linked to the subject by any fact (see :func:`distractors`). lm-eval scores the log-likelihood of each choice
as the continuation.

Tasks: ``ctune_retention`` (facts the base knows), ``ctune_target`` (facts introduced up to day D) and
``ctune_new`` (facts introduced on day D).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from ctune_ops.config import CtuneConfig
from ctune_ops.records import write_jsonl
from ctune_ops.workspace import atomic_write_text
from ctune_ops.world.knowledge import Fact, KnowledgeBase, answer_prefix
from ctune_ops.world.templates import RELATIONS_BY_NAME

CHOICES = 4
RETENTION_TASK = "ctune_retention"
TARGET_TASK = "ctune_target"
NEW_TASK = "ctune_new"


def distractors(kb: KnowledgeBase, fact: Fact, rng: random.Random) -> list[str]:
    """Three wrong objects of the fact's type, as familiar as the answer.

    Familiarity is first how often an object answers *this relation* in the day-0 corpus, then how often it is
    mentioned at all: a model that has seen an object as the answer to "what does X treat?" prefers it for any
    drug, so a new fact's answer (usually never a day-0 answer of its relation) must not stand among distractors
    that were, or the item would be harder than chance for a model that knows nothing about the fact. Objects of
    the fact's own specialty come first; others of the same type fill in when too few match in familiarity.
    """
    relation = RELATIONS_BY_NAME[fact.relation]
    excluded = kb.linked(fact.subject) | {fact.object}
    own = set(kb.pool(relation, fact.specialty))
    pool = [e.name for e in kb.entities.values() if e.type == relation.object_type and e.name not in excluded]
    if len(pool) < CHOICES - 1:
        raise ValueError(f"fact {fact.id}: only {len(pool)} possible distractors; raise world.entities")

    def distance(name: str) -> tuple[int, int, int]:
        return (
            abs(kb.relation_familiarity.get((fact.relation, name), 0)
                - kb.relation_familiarity.get((fact.relation, fact.object), 0)),
            name not in own,
            abs(kb.familiarity.get(name, 0) - kb.familiarity.get(fact.object, 0)),
        )

    rng.shuffle(pool)
    pool.sort(key=distance)
    return pool[: CHOICES - 1]


def eval_items(kb: KnowledgeBase, facts: list[Fact], config: CtuneConfig) -> list[dict[str, Any]]:
    """``world.eval_items_per_fact`` items per fact, in held-out wordings only."""
    world, prompt = config.world, config.models.prompt
    items = []
    for fact in facts:
        rng = random.Random(f"ctune-world:{world.seed}:eval:{fact.id}")
        wrong = distractors(kb, fact, rng)
        questions, answers = fact.wordings("eval", world)
        relation = RELATIONS_BY_NAME[fact.relation]
        # Distinct (question, answer) wordings, questions varying fastest: (q0,a0), (q1,a1), (q2,a0), ...
        pairs = sorted(
            ((q, a) for q in range(len(questions)) for a in range(len(answers))),
            key=lambda p: ((p[1] - p[0]) % len(answers), p[0]),
        )
        for j, (q_index, a_index) in enumerate(pairs[: world.eval_items_per_fact]):
            question = relation.questions[questions[q_index]]
            answer = answers[a_index]
            choices = [fact.object, *wrong]
            rng.shuffle(choices)
            context = prompt.render(
                question.instruction.format(s=fact.subject), question.input.format(s=fact.subject)
            ) + answer_prefix(fact, answer)
            items.append({
                "id": f"{fact.id}-e{j}", "fact_id": fact.id, "relation": fact.relation,
                "context": context, "choices": choices, "label": choices.index(fact.object),
            })
    return items


def task_config(name: str, data_file: Path) -> dict[str, Any]:
    """An lm-eval 0.4 multiple-choice task over a local JSONL file (absolute path: lm-eval resolves relative
    ``data_files`` against the process's working directory, not the YAML)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def write_task(folder: Path, name: str, items: list[dict[str, Any]]) -> Path:
    """Write ``folder/name.jsonl`` and ``folder/name.yaml``; returns the YAML's path."""
    data_file = folder / f"{name}.jsonl"
    write_jsonl(data_file, items)
    path = folder / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(task_config(name, data_file), sort_keys=False))
    return path


def retention_dir(eval_root: Path) -> Path:
    return eval_root / "retention"


def day_dir(eval_root: Path, date: str) -> Path:
    return eval_root / "days" / date

"""Task-matched replay (ctune_ops/selection/replay.py): each selected row's nearest trained row by word-set
Jaccard, distinct, reproducible; and the select config refuses replay shares that add up to more than the replay."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ctune_ops.config import SelectConfig
from ctune_ops.selection.replay import most_similar, row_words

TEMPLATES = {  # relation -> (question, answer) with the subject and object left open
    "treats": ("Which disease does {s} treat?", "The condition treated by {s} is {o}."),
    "dose": ("What is the usual dose of {s}?", "The usual dose of {s} is {o}."),
    "class": ("What class of medicine is {s}?", "Pharmacologically, {s} is among the {o}."),
}


def _row(relation: str, subject: str, obj: str) -> dict[str, str]:
    question, answer = TEMPLATES[relation]
    return {"instruction": question.format(s=subject), "input": "", "output": answer.format(s=subject, o=obj)}


def _pool() -> list[dict[str, str]]:
    subjects = [f"Drug{k}" for k in range(6)]
    return [_row(relation, s, f"object{k}{relation}") for relation in TEMPLATES for k, s in enumerate(subjects)]


def test_each_query_gets_a_row_of_its_own_task() -> None:
    pool = _pool()
    queries = [_row("dose", "Newdrug", "5 mg"), _row("class", "Otherdrug", "kiban modulators"),
               _row("treats", "Thirddrug", "Osk fever")]
    chosen = most_similar(queries, pool, 6)
    assert len(chosen) == len(set(chosen)) == 6
    marker = {"treats": "treat?", "dose": "dose", "class": "class"}
    relations = [next(r for r in TEMPLATES if marker[r] in pool[k]["instruction"]) for k in chosen]
    assert relations == ["dose", "class", "treats"] * 2  # queries take turns, each keeps to its task
    assert chosen == most_similar(queries, pool, 6)  # reproducible


def test_shared_words_decide_and_ties_go_to_the_lower_index() -> None:
    pool = [{"instruction": "alpha beta", "output": "gamma"}, {"instruction": "alpha beta", "output": "gamma"},
            {"instruction": "delta", "output": "epsilon"}]
    assert row_words(pool[0]) == {"alpha", "beta", "gamma"}
    assert most_similar([{"instruction": "Alpha BETA", "output": "zeta"}], pool, 2) == [0, 1]
    assert most_similar([{"instruction": "delta", "output": ""}], pool, 1) == [2]
    assert most_similar([{"instruction": "x", "output": "y"}], pool, 5) == [0, 1, 2]  # no overlap: pool order
    assert most_similar([], pool, 3) == [] and most_similar(pool, [], 3) == []


def test_replay_shares_cannot_exceed_the_replay() -> None:
    SelectConfig(replay_least_known=0.5, replay_similar=0.5, replay_stream=0.0)
    SelectConfig(replay_least_known=0.25, replay_similar=0.5, replay_stream=0.25)
    with pytest.raises(ValidationError, match="more than the whole replay"):
        SelectConfig(replay_least_known=0.6, replay_similar=0.5, replay_stream=0.0)
    with pytest.raises(ValidationError, match=r"replay_stream \(0.25\) is more than the whole replay"):
        SelectConfig(replay_least_known=0.5, replay_similar=0.5)

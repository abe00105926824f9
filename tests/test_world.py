"""The demo world: determinism, the configured mix, truth consistent with the rows, eval sets, familiarity."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ctune_ops.config import CtuneConfig
from ctune_ops.records import read_jsonl
from ctune_ops.workspace import Workspace, WorkspaceError, init_workspace
from ctune_ops.world import evalsets
from ctune_ops.world.generate import corpus_rows, generate_world
from ctune_ops.world.knowledge import build_knowledge, render
from ctune_ops.world.stream import KINDS, StreamGenerator, day_counts, jaccard
from ctune_ops.world.templates import ANSWER_FAMILY, QUESTION_FAMILY, RELATIONS

from .conftest import SMALL_DAYS

PHI_PATTERNS = {
    "phone": re.compile(r"(\(\d{3}\) |\+1 )?\d{3}[- ]\d{3}[- ]\d{4}|\(\d{3}\) \d{3}-\d{4}"),
    "email": re.compile(r"[\w.]+@[\w.]+\.\w+"),
    "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "mrn": re.compile(r"MRN[:#]? ?\d{8}"),
}


def _files(root: Path, folders: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = path.read_bytes().replace(str(root).encode(), b"<WS>")
    return out


def _lines(ws: Workspace, date: str) -> dict[tuple[str, int], bytes]:
    lines = {}
    for path in sorted(ws.incoming(date).iterdir()):
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
        newline = b"\r\n" if b"\r\n" in data else b"\n"
        for number, line in enumerate(data.removesuffix(newline).split(newline), start=1):
            lines[(path.name, number)] = line
    return lines


def test_same_seed_same_bytes_and_days_are_prefix_stable(tmp_path: Path) -> None:
    a = init_workspace(tmp_path / "a").workspace
    b = init_workspace(tmp_path / "b").workspace
    generate_world(a, days=3, seed=5, commit=False)
    generate_world(b, days=2, seed=5, commit=False)
    files_a, files_b = _files(a.root, ("incoming", "world", "eval")), _files(b.root, ("incoming", "world", "eval"))
    shared = [k for k in files_b if k != "world/manifest.json"]
    assert shared and all(files_a[k] == files_b[k] for k in shared)
    generate_world(b, days=3, seed=5, commit=False)
    assert _files(b.root, ("incoming", "world", "eval")) == files_a
    c = init_workspace(tmp_path / "c").workspace
    generate_world(c, days=1, seed=6, commit=False)
    assert _files(c.root, ("incoming",)) != {k: v for k, v in files_a.items() if "2026-01-01" in k}


def test_generate_commits_and_refuses_another_seed(workspace: Workspace) -> None:
    result = generate_world(workspace, days=1)
    assert result.committed
    assert (workspace.root / "incoming.dvc").exists()
    assert workspace.git("status", "--porcelain").stdout == ""
    assert not generate_world(workspace, days=1).committed
    with pytest.raises(WorkspaceError, match="seed 0"):
        generate_world(workspace, days=1, seed=1)


@pytest.mark.parametrize("day", [1, 2, 5])
def test_mix_within_five_points(day: int) -> None:
    world = CtuneConfig().world
    counts = day_counts(world, day)
    assert sum(counts.values()) == world.rows_per_day
    shares = world.mix.model_dump()
    if day == 1:
        shares["known"] += shares.pop("earlier")
        shares["earlier"] = 0.0
    for kind in KINDS:
        assert abs(counts[kind] / world.rows_per_day - shares[kind]) <= 0.05, kind


def test_generated_mix_matches_truth(small_world: Workspace) -> None:
    world = small_world.config.world
    for day, date in enumerate(world.day_dates(SMALL_DAYS), start=1):
        truth = list(read_jsonl(small_world.world_dir / "truth" / f"{date}.jsonl"))
        assert len(truth) == world.rows_per_day == len(_lines(small_world, date))
        counts = Counter(t["kind"] for t in truth)
        assert counts == Counter({k: v for k, v in day_counts(world, day).items() if v})


def test_truth_is_consistent_with_rows(small_world: Workspace) -> None:
    ws, world = small_world, small_world.config.world
    kb = build_knowledge(world)
    seen: dict[str, dict] = {}
    introduced: dict[str, int] = {}
    for day, date in enumerate(world.day_dates(SMALL_DAYS), start=1):
        lines = _lines(ws, date)
        for t in read_jsonl(ws.world_dir / "truth" / f"{date}.jsonl"):
            raw = lines[(t["file"], t["line"])]
            kind = t["kind"]
            if kind == "malformed":
                _check_malformed(t["subkind"], raw, world.overlong_chars)
                continue
            row = json.loads(raw)
            assert row["id"] == t["id"]
            seen[row["id"]] = row
            if kind in ("new", "known", "earlier"):
                fact = kb.facts[t["fact_id"]]
                expected = render(fact, t["question"], t["answer"])
                assert {k: row[k] for k in expected} == expected
                role = "train" if kind == "new" else "reappear"
                questions, answers = fact.wordings(role, world)
                assert t["question"] in questions and t["answer"] in answers
                assert fact.known == (kind == "known")
                if kind == "new":
                    introduced.setdefault(fact.id, day)
                    assert introduced[fact.id] == day
                if kind == "earlier":
                    assert introduced[fact.id] < day
            elif kind == "duplicate":
                original = seen[t["duplicate_of"]]
                fields = ("instruction", "input", "output")
                if t["subkind"] == "exact":
                    assert all(row[f] == original[f] for f in fields)
                else:
                    assert any(row[f] != original[f] for f in fields)
                    assert jaccard(row, original) >= 0.9
            elif kind == "phi":
                text = row["instruction"] + " " + row["input"]
                assert PHI_PATTERNS[t["subkind"]].search(text), (t["subkind"], text)


def _check_malformed(subkind: str, raw: bytes, overlong: int) -> None:
    if subkind == "invalid_utf8":
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        return
    text = raw.decode("utf-8")
    if subkind == "bad_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        return
    value = json.loads(text)
    if subkind == "not_object":
        assert not isinstance(value, dict)
    elif subkind == "missing_field":
        assert not {"instruction", "output"} <= value.keys()
    elif subkind == "blank_text":
        assert not value["instruction"].strip() or not value["output"].strip()
    elif subkind == "overlong":
        assert len(value["output"]) == overlong
    elif subkind == "wrong_type":
        assert not isinstance(value["output"], str)


def test_new_specialties_appear_over_time() -> None:
    world = CtuneConfig().world
    kb = build_knowledge(world)
    stream = StreamGenerator(world, kb, world.day_dates(7))
    specialties = [{kb.facts[f].specialty for f in stream.next_day().new_facts} for _ in range(7)]
    first = set(kb.specialties[: world.specialties.initial])
    assert specialties[0] <= first
    later = set().union(*specialties[2:])
    assert later - first, "no new specialty by day 7"


def test_day0_corpus_names_every_entity_and_uses_every_wording() -> None:
    config = CtuneConfig()
    kb = build_knowledge(config.world)
    rows = corpus_rows(kb, config)
    text = "\n".join(r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows)
    for name in kb.entities:
        assert name in text, name
    used = Counter()
    for fact in kb.known:
        questions, answers = fact.wordings("train", config.world)
        used.update((fact.relation, "q", q) for q in questions)
        used.update((fact.relation, "a", a) for a in answers)
    for relation in RELATIONS:
        assert all(used[(relation.name, "q", q)] for q in range(QUESTION_FAMILY)), relation.name
        assert all(used[(relation.name, "a", a)] for a in range(ANSWER_FAMILY)), relation.name


def test_wordings_are_disjoint_per_fact() -> None:
    world = CtuneConfig().world
    for fact in build_knowledge(world).facts.values():
        (train_q, train_a), (again_q, again_a), (eval_q, eval_a) = (
            fact.wordings(role, world) for role in ("train", "reappear", "eval")
        )
        questions = train_q + again_q + eval_q
        assert len(set(questions)) == len(questions)
        assert again_a == train_a and not set(train_a) & set(eval_a)


def test_eval_items_are_fair(small_world: Workspace) -> None:
    ws, config = small_world, small_world.config
    kb = build_knowledge(config.world)
    retention = list(read_jsonl(evalsets.retention_dir(ws.eval_dir) / "ctune_retention.jsonl"))
    assert len(retention) == len(kb.known) * config.world.eval_items_per_fact
    last = config.world.day_dates(SMALL_DAYS)[-1]
    target = list(read_jsonl(evalsets.day_dir(ws.eval_dir, last) / "ctune_target.jsonl"))
    assert {i["fact_id"] for i in target} <= {f.id for f in kb.new_queue}
    for item in retention + target:
        fact = kb.facts[item["fact_id"]]
        choices = item["choices"]
        assert len(set(choices)) == 4 and choices[item["label"]] == fact.object
        types = {kb.entities[c].type for c in choices}
        assert types == {kb.entities[fact.object].type}
        assert not (set(choices) - {fact.object}) & kb.linked(fact.subject)
        assert item["context"].startswith("### Instruction:\n")
        for row in corpus_rows(kb, config):  # the eval wording is not the training wording of the fact
            if row["fact_id"] == fact.id:
                assert row["instruction"] not in item["context"]
    task = yaml.safe_load((evalsets.day_dir(ws.eval_dir, last) / "ctune_target.yaml").read_text())
    assert task["task"] == "ctune_target" and task["output_type"] == "multiple_choice"
    assert Path(task["dataset_kwargs"]["data_files"]["test"]).is_absolute()


def test_world_needs_enough_entities() -> None:
    world = CtuneConfig().world.model_copy(update={"known_facts": 10})
    with pytest.raises(ValueError, match="world.known_facts"):
        build_knowledge(world)

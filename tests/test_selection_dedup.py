"""MinHash accuracy and the dedup rules, on generated text (no models needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ctune_ops.config import DedupConfig
from ctune_ops.selection.history import TRAINED, History
from ctune_ops.selection.minhash import MinHasher, band_keys, estimated_jaccard
from ctune_ops.stages import run_stage
from ctune_ops.world.stream import word_shingles
from tests.conftest import set_params

VOCAB = [f"w{i}" for i in range(400)]


def _exact(a: str, b: str) -> float:
    sa, sb = word_shingles(a), word_shingles(b)
    return len(sa & sb) / len(sa | sb)


def _pairs(count: int, seed: int = 7) -> list[tuple[str, str]]:
    """Pairs over the whole similarity range: a text and a copy with a random share of its words replaced."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        words = [rng.choice(VOCAB) for _ in range(rng.randrange(20, 120))]
        other = list(words)
        for i in rng.sample(range(len(words)), int(len(words) * rng.random() * 0.5)):
            other[i] = rng.choice(VOCAB)
        if rng.random() < 0.3:
            other = other[rng.randrange(5):]
        pairs.append((" ".join(words), " ".join(other)))
    return pairs


def _estimates(pairs: list[tuple[str, str]], num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    hasher = MinHasher(num_perm=num_perm)
    sig = hasher.signatures([t for pair in pairs for t in pair])
    est = estimated_jaccard(sig[0::2], sig[1::2])
    return est, np.array([_exact(a, b) for a, b in pairs])


def test_minhash_estimates_jaccard_within_0_1() -> None:
    pairs = _pairs(300)
    est, exact = _estimates(pairs, 512)
    assert exact.min() < 0.2 and exact.max() > 0.9  # the pairs cover the range
    assert np.abs(est - exact).max() <= 0.1
    # the default 128 permutations: standard error <= 0.044, so a few pairs in 300 may miss by more than 0.1,
    # but the estimate is unbiased
    est, exact = _estimates(pairs, DedupConfig().num_perm)
    assert np.mean(np.abs(est - exact) <= 0.1) >= 0.97
    assert abs(float(np.mean(est - exact))) <= 0.01


def test_minhash_is_deterministic_and_batch_independent() -> None:
    texts = [a for a, _ in _pairs(50)]
    whole = MinHasher().signatures(texts)
    one_by_one = np.concatenate([MinHasher().signatures([t]) for t in texts])
    assert np.array_equal(whole, one_by_one)
    assert np.array_equal(band_keys(whole, 16), band_keys(one_by_one, 16))
    assert MinHasher().signatures(["", "a", "a b"]).shape == (3, 128)  # short and empty texts have one shingle


_ALPHABET = "aB_9 .,-\u2013\u2019\u0130i\u00dfSs\u00e7\u65e5\u672c\u0307\u00a0\t\n!\u03a9\u00e9\u212a"


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])  # many chunks with texts above the chunk size; one chunk
def test_words_are_the_regex_words_of_the_lower_cased_text(monkeypatch, chunk_bytes: int) -> None:  # noqa: ANN001
    import re

    from ctune_ops.selection import minhash

    monkeypatch.setattr(minhash, "_BYTES_PER_CHUNK", chunk_bytes)
    rng = random.Random(3)
    texts = ["".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 200))) for _ in range(400)]
    texts += ["", " ", "word", "\u0130stanbul \u015eEH\u0130R", "x" * 500, " ".join(VOCAB) * 3]
    hashes, counts = MinHasher().word_hashes(texts)
    words = [re.findall(r"\w+", t.lower()) for t in texts]
    assert counts.tolist() == [len(w) for w in words]
    hash_of: dict[str, int] = {}
    for word, value in zip([w for ws in words for w in ws], hashes.tolist(), strict=True):
        assert hash_of.setdefault(word, value) == value  # a word always hashes the same
    assert len(set(hash_of.values())) == len(hash_of)  # and distinct words differently
    assert len(hash_of) > 400


def test_shingle_hashes_are_the_word_shingles() -> None:
    texts = [a for pair in _pairs(40) for a in pair] + ["", "one", "one two", "one two three", "Two, one! two"]
    shingles, per_text = MinHasher().shingle_hashes(texts)
    assert per_text.tolist() == [max(len(t.split()) - 2, 1) for t in texts[:80]] + [1, 1, 1, 1, 1]
    bounds = np.concatenate(([0], np.cumsum(per_text)))
    sets = [set(shingles[bounds[i] : bounds[i + 1]].tolist()) for i in range(len(texts))]
    for i in range(0, 80, 2):  # the Jaccard of the shingle hash sets is the exact Jaccard of the word shingles
        assert len(sets[i] & sets[i + 1]) / len(sets[i] | sets[i + 1]) == pytest.approx(_exact(texts[i], texts[i + 1]))
    assert len(set.union(*sets[80:])) == 5  # five different short texts, five different shingles


def _greedy_reference(signatures: np.ndarray, keys: np.ndarray, threshold: float) -> list[tuple[int, float] | None]:
    """Keep the first, the slow way: each row against every earlier kept row sharing a band key."""
    kept: list[int] = []
    out: list[tuple[int, float] | None] = []
    for j in range(len(signatures)):
        close = [(float(np.mean(signatures[i] == signatures[j])), -i) for i in kept
                 if np.any(keys[i] == keys[j])]
        close = [c for c in close if c[0] >= threshold]
        if close:
            score, neg_i = max(close)
            out.append((-neg_i, score))
        else:
            kept.append(j)
            out.append(None)
    return out


def test_batch_duplicates_keep_the_first_and_compare_with_kept_rows_only() -> None:
    from ctune_ops.selection.dedup import _batch_duplicates
    from ctune_ops.selection.history import NewRow

    rng = random.Random(11)
    texts: list[str] = []
    for _ in range(40):  # chains of single-word edits: a copy is near its parent, less near the root
        words = [rng.choice(VOCAB) for _ in range(rng.randrange(40, 100))]
        texts.append(" ".join(words))
        for _ in range(rng.randrange(0, 6)):
            words = list(words)
            words[rng.randrange(len(words))] = rng.choice(VOCAB)
            texts.append(" ".join(words))
    rng.shuffle(texts)
    texts += [texts[0] + " w1", texts[0] + " w2"]
    hasher = MinHasher()
    signatures = hasher.signatures(texts)
    keys = band_keys(signatures, 16)
    rows = [NewRow(f"r{i}", str(i), signatures[i], keys[i], {}) for i in range(len(texts))]
    result: list = [None] * len(rows)
    _batch_duplicates(rows, list(range(len(rows))), "2026-01-01", 0.85, result)
    expected = _greedy_reference(signatures, keys, 0.85)
    got = [None if d is None else (int(d.duplicate_of[1:]), d.jaccard) for d in result]
    assert got == expected
    assert 10 <= sum(d is not None for d in got) < len(got) - 50  # the batch has drops and keeps


def _record(row_id: str, instruction: str, output: str) -> dict[str, str]:
    return {"id": row_id, "instruction": instruction, "input": "", "output": output}


def _write_accepted(ws, date: str, records: list[dict]) -> None:  # noqa: ANN001
    path = ws.accepted(date)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


LONG = "what is the usual adult dose of zorvastin for a patient with chronic renal colic and mild fever"
ANSWER = "the usual adult dose of zorvastin is forty milligrams twice a day taken with food and water"


def test_dedup_stage_rules(workspace) -> None:  # noqa: ANN001
    ws = set_params(workspace, {"select": {"trained_reference": None}})
    day1 = [
        _record("a", LONG, ANSWER),
        _record("b", "which test confirms pelvic marrow syndrome in adults", "the marrow biopsy confirms it"),
        _record("c", LONG, ANSWER),  # exact copy of a
        _record("d", "Please answer: " + LONG, ANSWER),  # near copy of a
        _record("e", "name one symptom of glarian fever", "a dry cough is one symptom of glarian fever"),
    ]
    _write_accepted(ws, "2026-01-01", day1)
    summary = run_stage(ws, "dedup", "2026-01-01").summary
    assert summary["unique"] == 3 and summary["by_reason"] == {"exact_duplicate_batch": 1, "near_duplicate_batch": 1}
    drops = {d["row_id"]: d for d in json.loads((ws.reports("2026-01-01") / "dedup.json").read_text())["drops"]}
    assert drops["c"]["duplicate_of"] == "a" and drops["d"]["duplicate_of"] == "a"
    assert [json.loads(line)["id"] for line in ws.unique("2026-01-01").read_text().splitlines()] == ["a", "b", "e"]

    with History(ws.history_db, ws.config.dedup) as history:
        assert history.count() == 3
        history.set_decisions("2026-01-01", {"a": (TRAINED, "v1"), "b": ("misaligned", None)})
    day2 = [
        _record("f", "Quick question: " + LONG, ANSWER),  # near a (trained, Jaccard 0.94): dropped against history
        _record("g", "which test confirms pelvic marrow syndrome in adults", "the marrow biopsy confirms it"),
        _record("h", LONG, ANSWER),  # exact a
    ]
    _write_accepted(ws, "2026-01-02", day2)
    summary = run_stage(ws, "dedup", "2026-01-02").summary
    # g repeats b, but b was misaligned (not trained, not known): it may be learned now
    assert summary["by_reason"] == {"exact_duplicate_history": 1, "near_duplicate_history": 1}
    drops = {d["row_id"]: d for d in json.loads((ws.reports("2026-01-02") / "dedup.json").read_text())["drops"]}
    assert drops["f"]["duplicate_of"] == "a" and drops["f"]["duplicate_of_date"] == "2026-01-01"
    assert drops["h"]["reason"] == "exact_duplicate" and drops["h"]["scope"] == "history"

    # reruns never double-insert and keep the decisions already made
    first = (ws.unique("2026-01-01").read_bytes(), (ws.reports("2026-01-01") / "dedup.json").read_bytes())
    run_stage(ws, "dedup", "2026-01-01")
    run_stage(ws, "dedup", "2026-01-02")
    with History(ws.history_db, ws.config.dedup) as history:
        assert history.count() == 4
        assert history.decisions("2026-01-01")["a"] == (TRAINED, "v1")
    assert (ws.unique("2026-01-01").read_bytes(), (ws.reports("2026-01-01") / "dedup.json").read_bytes()) == first


def test_dedup_settings_change_rehashes_history(workspace) -> None:  # noqa: ANN001
    ws = set_params(workspace, {"select": {"trained_reference": None}})
    _write_accepted(ws, "2026-01-01", [_record("a", LONG, ANSWER)])
    run_stage(ws, "dedup", "2026-01-01")
    with History(ws.history_db, ws.config.dedup) as history:
        history.set_decisions("2026-01-01", {"a": (TRAINED, "v1")})
    ws = set_params(ws, {"dedup": {"num_perm": 64, "bands": 8}})
    _write_accepted(ws, "2026-01-02", [_record("b", "Please answer: " + LONG, ANSWER)])
    assert run_stage(ws, "dedup", "2026-01-02").summary["by_reason"] == {"near_duplicate_history": 1}


def test_dedup_needs_validate_output(workspace) -> None:  # noqa: ANN001
    from ctune_ops.stages import StageError

    with pytest.raises(StageError, match="data/accepted/2026-01-01.jsonl does not exist: run the validate stage"):
        run_stage(workspace, "dedup", "2026-01-01")

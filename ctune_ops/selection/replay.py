"""Task-matched replay: for each row selected today, the trained row that asks the most similar thing.

Why: continuing the deployed adapter on a day's new facts shifts the model's answers for *other* facts of the same
kind towards the new answers (demo world, day 4: 14 of the 25 retention items the candidate lost were of the three
relations the new facts had, and several picked a new fact's object). Random replay barely touches those
relations (it is mostly the base corpus, spread over every relation); replaying, beside each new row, a trained
row of the same task with another answer rehearses exactly the distinctions the new row blurs. Similarity is the
Jaccard index of the rows' word sets (instruction, input and output, lower-cased ``\\w+`` words), which a shared
question and answer wording dominates; no model is needed, so it costs milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_WORD = re.compile(r"\w+")


def row_words(record: dict[str, Any]) -> set[str]:
    """The lower-cased words of a row's instruction, input and output."""
    text = " ".join(str(record.get(key) or "") for key in ("instruction", "input", "output"))
    return set(_WORD.findall(text.lower()))


def most_similar(queries: Sequence[dict[str, Any]], pool: Sequence[dict[str, Any]], count: int) -> list[int]:
    """Indices into ``pool`` of ``count`` distinct rows: the queries' nearest rows by word-set Jaccard.

    The queries take turns (first query, second, ..., then the first again while ``count`` is not reached), so
    with fewer picks than queries only the first ``count`` queries get one: a caller that wants them spread
    passes the queries in a random order. Each takes its most similar pool row not taken yet, ties to the lower
    pool index, so the result is reproducible.
    """
    count = min(count, len(pool))
    if not count or not queries:
        return []
    queries = queries[:count]  # the rest would get no turn
    vocabulary: dict[str, int] = {}
    pool_words = [np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in row_words(r)), dtype=np.int64)
                  for r in pool]
    sizes = np.array([len(w) for w in pool_words], dtype=np.float64)
    # inverted index: word id -> pool rows holding it (pool rows sorted by word id, cut at word boundaries)
    flat_words = np.concatenate(pool_words) if pool_words else np.zeros(0, dtype=np.int64)
    flat_rows = np.repeat(np.arange(len(pool)), [len(w) for w in pool_words])
    order = np.argsort(flat_words, kind="stable")
    flat_words, flat_rows = flat_words[order], flat_rows[order]
    starts = np.searchsorted(flat_words, np.arange(len(vocabulary) + 1))
    similarity = []
    for record in queries:
        ids = [vocabulary[w] for w in row_words(record) if w in vocabulary]
        hits = (np.concatenate([flat_rows[starts[i]:starts[i + 1]] for i in ids]) if ids
                else np.zeros(0, dtype=np.int64))
        inter = np.bincount(hits, minlength=len(pool)).astype(np.float64)
        union = sizes + len(row_words(record)) - inter
        similarity.append(np.divide(inter, union, out=np.zeros(len(pool)), where=union > 0))
    ranked = [np.lexsort((np.arange(len(pool)), -s)) for s in similarity]  # best first, ties by index
    taken: set[int] = set()
    chosen: list[int] = []
    cursor = [0] * len(queries)
    while len(chosen) < count:
        for q, ranks in enumerate(ranked):
            while cursor[q] < len(ranks) and int(ranks[cursor[q]]) in taken:
                cursor[q] += 1
            if cursor[q] < len(ranks):
                chosen.append(int(ranks[cursor[q]]))
                taken.add(chosen[-1])
            if len(chosen) == count:
                break
    return chosen

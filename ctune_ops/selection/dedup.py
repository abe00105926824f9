"""Which rows of a batch repeat something: exact and near duplicates, within the batch and against history.

Order of the checks, and why: exact copies in the batch collapse onto their first occurrence first (cheap, and
the copies then share whatever happens to that first row); the remaining rows are checked against history rows
that were trained or judged known (fingerprint, then LSH candidates confirmed by estimated Jaccard); the rows
still standing are checked against each other, greedily in batch order, so every dropped row names a row that
is kept ("keep the first").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ctune_ops.selection.history import History, NewRow
from ctune_ops.selection.minhash import pair_jaccard

EXACT, NEAR = "exact_duplicate", "near_duplicate"
BATCH, HISTORY = "batch", "history"


@dataclass(frozen=True)
class Duplicate:
    """Why one row is dropped: it repeats ``duplicate_of`` (a row id; ``duplicate_of_date`` is that row's batch)."""

    row_id: str
    reason: str
    scope: str
    duplicate_of: str
    duplicate_of_date: str
    jaccard: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _group_pairs(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(p, q)``, ``p < q``, of every pair inside each group ``[start, start + size)``, without a loop:
    each member is repeated once per later member of its group, then offset by 1, 2, ... to that member."""
    member = np.repeat(starts, sizes) + (np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    later = np.repeat(starts + sizes, sizes) - member - 1
    first = np.repeat(member, later)
    offset = np.arange(later.sum()) - np.repeat(np.cumsum(later) - later, later) + 1
    return first, first + offset


def batch_pairs(keys: np.ndarray) -> np.ndarray:
    """(pairs, 2) indices ``i < j`` of rows sharing at least one band key, each pair once.

    Keys are salted with their band, so one sort over all of them finds every group, and every group (of any
    size) becomes its pairs with array arithmetic.
    """
    rows, bands = keys.shape
    flat = keys.ravel()
    owner = np.repeat(np.arange(rows, dtype=np.int64), bands)
    order = np.argsort(flat, kind="stable")
    ordered, members = flat[order], owner[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(flat)])
    shared = sizes > 1
    first, second = _group_pairs(starts[shared], sizes[shared])
    low, high = np.minimum(members[first], members[second]), np.maximum(members[first], members[second])
    code = np.unique(low[low != high] * rows + high[low != high])  # one int64 per pair: a fast unique
    return np.stack([code // rows, code % rows], axis=1)


def _history_duplicates(rows: Sequence[NewRow], heads: list[int], date: str, history: History, threshold: float,
                        eligible: Sequence[str], result: list[Duplicate | None]) -> None:
    """Mark heads that repeat an eligible history row: same fingerprint, or LSH candidate close enough."""
    exact = history.exact_matches([rows[i].fingerprint for i in heads], date, eligible)
    for index in heads:
        match = exact.get(rows[index].fingerprint)
        if match:
            result[index] = Duplicate(rows[index].row_id, EXACT, HISTORY, match[1], match[0], 1.0)
    open_heads = [i for i in heads if result[i] is None]
    if not open_heads:
        return
    items, slots, candidates = history.band_candidates(np.stack([rows[i].keys for i in open_heads]), date, eligible)
    if not len(items):
        return
    scores = pair_jaccard(np.stack([rows[i].signature for i in open_heads]), items, slots,
                          np.stack([c.signature for c in candidates]))
    best: dict[int, tuple[float, int]] = {}  # first of the highest scores: pairs come in (item, date, ref) order
    close = np.flatnonzero(scores >= threshold)
    for item, score, slot in zip(items[close].tolist(), scores[close].tolist(), slots[close].tolist(), strict=True):
        if score > best.get(item, (-1.0, 0))[0]:
            best[item] = (score, slot)
    for item, (score, slot) in best.items():
        index, match = open_heads[item], candidates[slot]
        result[index] = Duplicate(rows[index].row_id, NEAR, HISTORY, match.row_id, match.date, score)


def _batch_duplicates(rows: Sequence[NewRow], standing: list[int], date: str, threshold: float,
                      result: list[Duplicate | None]) -> None:
    """Mark rows near an earlier row of the batch that is kept, greedily in batch order."""
    if len(standing) < 2:
        return
    pairs = batch_pairs(np.stack([rows[i].keys for i in standing]))
    if not len(pairs):
        return
    signatures = np.stack([rows[i].signature for i in standing])
    scores = pair_jaccard(signatures, pairs[:, 0], pairs[:, 1])
    close = scores >= threshold
    earlier: dict[int, list[tuple[int, float]]] = {}
    for (i, j), score in zip(pairs[close].tolist(), scores[close].tolist(), strict=True):
        earlier.setdefault(j, []).append((i, score))
    dropped: set[int] = set()
    for j in sorted(earlier):
        kept = [(score, -i) for i, score in earlier[j] if i not in dropped]
        if kept:
            score, neg_i = max(kept)
            dropped.add(j)
            index, of = standing[j], standing[-neg_i]
            result[index] = Duplicate(rows[index].row_id, NEAR, BATCH, rows[of].row_id, date, score)


def find_duplicates(rows: Sequence[NewRow], date: str, history: History, threshold: float,
                    eligible: Sequence[str]) -> list[Duplicate | None]:
    """For each row, None when it is kept, else the Duplicate that drops it (see the module docstring)."""
    result: list[Duplicate | None] = [None] * len(rows)
    first: dict[str, int] = {}
    copies: list[int] = []
    for index, row in enumerate(rows):
        if row.fingerprint in first:
            copies.append(index)
        else:
            first[row.fingerprint] = index
    heads = sorted(first.values())
    _history_duplicates(rows, heads, date, history, threshold, eligible, result)
    _batch_duplicates(rows, [i for i in heads if result[i] is None], date, threshold, result)
    for index in copies:
        of = first[rows[index].fingerprint]
        result[index] = Duplicate(rows[index].row_id, EXACT, BATCH, rows[of].row_id, date, 1.0)
    return result

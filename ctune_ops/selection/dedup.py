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


def shared_band_groups(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Which LSH groups each row is in: ``(groups, count)``.

    ``groups[r, b]`` numbers (0 .. count - 1) the group of rows whose band ``b`` equals row ``r``'s (keys are
    salted with their band, so one sort over all keys finds every group), or is -1 when no other row shares it.
    """
    rows, bands = keys.shape
    flat = keys.ravel()
    order = np.argsort(flat)
    ordered = flat[order]
    leads = np.r_[True, ordered[1:] != ordered[:-1]]
    sizes = np.diff(np.r_[np.flatnonzero(leads), len(flat)])
    shared = sizes[np.cumsum(leads) - 1] > 1
    numbers = np.cumsum(leads & shared) - 1  # shared groups numbered 0, 1, ... in key order
    groups = np.full(len(flat), -1, dtype=np.int64)
    groups[order[shared]] = numbers[shared]
    return groups.reshape(rows, bands), int(np.count_nonzero(leads & shared))


def _batch_duplicates(rows: Sequence[NewRow], standing: list[int], date: str, threshold: float,
                      result: list[Duplicate | None]) -> None:
    """Mark rows near an earlier row of the batch that is kept, greedily in batch order.

    Each row is compared only with the earlier *kept* rows it shares a band with (as an LSH index of the kept
    rows would do), not with every earlier candidate: a templated answer repeated in hundreds of rows is then
    hundreds of comparisons with its first copy, not the tens of thousands of pairs among all copies. Rows that
    share no band with another row are kept without a look. Of several close kept rows, the closest (then the
    earliest) is named.
    """
    if len(standing) < 2:
        return
    groups, count = shared_band_groups(np.stack([rows[i].keys for i in standing]))
    signatures = np.stack([rows[i].signature for i in standing])
    width = signatures.shape[1]
    kept_in: list[list[int]] = [[] for _ in range(count)]  # each group's kept rows so far, in row order
    for j in np.flatnonzero((groups >= 0).any(axis=1)).tolist():
        mine = groups[j][groups[j] >= 0].tolist()
        candidates = sorted({i for g in mine for i in kept_in[g]})
        if candidates:
            equal = np.count_nonzero(signatures[candidates] == signatures[j], axis=1)
            best = int(np.argmax(equal))  # the first of the highest: candidates are in row order
            score = float(equal[best]) / width  # as pair_jaccard computes it
            if score >= threshold:
                index, of = standing[j], standing[candidates[best]]
                result[index] = Duplicate(rows[index].row_id, NEAR, BATCH, rows[of].row_id, date, score)
                continue
        for g in mine:
            kept_in[g].append(j)


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
    close = np.flatnonzero(scores >= threshold)
    # per item, the first of its highest scores (slots are in (date, ref) order): sorted by item, -score, slot
    close = close[np.lexsort((slots[close], -scores[close], items[close]))]
    best = close[np.r_[True, items[close][1:] != items[close][:-1]]] if len(close) else close
    for item, score, slot in zip(items[best].tolist(), scores[best].tolist(), slots[best].tolist(), strict=True):
        index, match = open_heads[item], candidates[slot]
        result[index] = Duplicate(rows[index].row_id, NEAR, HISTORY, match.row_id, match.date, score)


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

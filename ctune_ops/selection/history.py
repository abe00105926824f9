"""``state/history.sqlite``: every row that reached scoring, with what became of it.

One table row per (batch date, record id): its fingerprint, MinHash signature and LSH band keys, its decision and
the version it concerns (*trained*: the version that trained it; *known*: the production version whose proxy
judged it known), and the record itself, so calibration and replay can read earlier rows without the day files.
Decisions move pending -> (selected | known | misaligned | too_novel | budget) at select, selected -> trained or
not_trained at promote/keep.

The database runs in WAL mode; every write is one transaction, so a killed task leaves it as it was. DVC versions
it with the models, so rolling back to a version restores the history of that version too.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctune_ops.config import DedupConfig
from ctune_ops.records import encode_jsonl, fingerprint
from ctune_ops.selection.minhash import HASH_SCHEME, MinHasher, band_keys, shingle_text
from ctune_ops.workspace import BASE_VERSION

SCHEMA_VERSION = "2"
REFERENCE_DATE = "0000-00-00"  # rows the base model was trained on sort before every batch date
PENDING, SELECTED, TRAINED, NOT_TRAINED, KNOWN = "pending", "selected", "trained", "not_trained", "known"
_IN_LIST = 500  # values per SQL IN (...) list
# A day writes thousands of rows (record and 512-byte signature each) and 16 band keys per row at random places of
# the band index; with 16 KiB pages that write is 18-22% faster than with SQLite's 4 KiB default (world rows,
# 2,000 a day: 106-117 ms -> 87-91 ms per day, median of 5-10 alternating runs; the whole two-day dedup of
# benchmarks/selection.py: 3-6%).
_PAGE_SIZE = 16384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    ref INTEGER PRIMARY KEY,
    date TEXT NOT NULL,
    row_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    signature BLOB NOT NULL,
    decision TEXT NOT NULL,
    version TEXT,
    record TEXT NOT NULL,
    UNIQUE (date, row_id)
);
CREATE INDEX IF NOT EXISTS rows_fingerprint ON rows (fingerprint);
CREATE INDEX IF NOT EXISTS rows_decision ON rows (decision, date);
CREATE TABLE IF NOT EXISTS bands (
    key INTEGER NOT NULL,  -- LSH key; salted with the band number, so equal keys mean the same band agrees
    ref INTEGER NOT NULL,
    PRIMARY KEY (key, ref)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS output_loss (
    output_sha TEXT NOT NULL,
    proxy_version TEXT NOT NULL,
    loss REAL NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (output_sha, proxy_version)
) WITHOUT ROWID;
"""


class HistoryError(RuntimeError):
    """The history database cannot be used as asked; the message says which file and why."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x (one per candidate and per row)
class HistoryRow:
    """One earlier row a batch row may duplicate."""

    ref: int
    date: str
    row_id: str
    decision: str
    signature: np.ndarray


@dataclass(slots=True)  # not frozen, as HistoryRow: 2,740 rows 3.6 -> 1.1 ms
class NewRow:
    """A row of today's batch that reached scoring."""

    row_id: str
    fingerprint: str
    signature: np.ndarray
    keys: np.ndarray
    record: dict[str, Any]


def record_fingerprint(record: dict[str, Any]) -> str:
    return fingerprint(record["instruction"], record.get("input", ""), record["output"])


def record_text(record: dict[str, Any]) -> str:
    return shingle_text(record["instruction"], record.get("input", ""), record["output"])


class History:
    """The open history database of a workspace (use as a context manager; closing checkpoints the WAL)."""

    def __init__(self, path: Path, dedup: DedupConfig) -> None:
        self.path = path
        self.dedup = dedup
        self.hasher = MinHasher(dedup.num_perm, dedup.shingle_words, dedup.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # applies when the file is created; else a no-op
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"{path}: not a usable SQLite database ({exc})") from None
        self._check_meta()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- settings ---------------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, str]:
        d = self.dedup
        return {"schema": SCHEMA_VERSION, "hash": HASH_SCHEME, "num_perm": str(d.num_perm), "bands": str(d.bands),
                "shingle_words": str(d.shingle_words), "seed": str(d.seed)}

    def _check_meta(self) -> None:
        stored = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        wanted = self._settings()
        if stored.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise HistoryError(f"{self.path}: schema {stored['schema']}, this ctune reads schema {SCHEMA_VERSION}")
        if stored and stored != wanted:
            self._rehash()  # dedup settings changed: signatures are recomputed from the stored records
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(wanted.items()))

    def _rehash(self) -> None:
        rows = self.db.execute("SELECT ref, record FROM rows ORDER BY ref").fetchall()
        refs = [ref for ref, _ in rows]
        signatures = self.hasher.signatures([record_text(json.loads(text)) for _, text in rows])
        keys = band_keys(signatures, self.dedup.bands)
        with self.transaction() as db:
            db.execute("DELETE FROM bands")
            db.executemany("UPDATE rows SET signature = ? WHERE ref = ?",
                           ((sig.tobytes(), ref) for ref, sig in zip(refs, signatures, strict=True)))
            db.executemany("INSERT OR IGNORE INTO bands VALUES (?, ?)", _band_rows(refs, keys))

    # -- reading ----------------------------------------------------------------------------------------------
    def count(self, decision: str | None = None) -> int:
        if decision is None:
            return self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM rows WHERE decision = ?", (decision,)).fetchone()[0]

    def _eligible(self, decisions: Sequence[str]) -> str:
        return f"r.decision IN ({', '.join('?' * len(decisions))}) AND r.date < ?"

    def exact_matches(self, fingerprints: Sequence[str], before: str,
                      decisions: Sequence[str]) -> dict[str, tuple[str, str]]:
        """fingerprint -> (date, row id) of the earliest eligible history row with that fingerprint."""
        found: dict[str, tuple[str, str]] = {}
        unique = sorted(set(fingerprints))
        sql = (f"SELECT r.fingerprint, r.date, r.row_id FROM rows r WHERE r.fingerprint IN ({{}}) AND "
               f"{self._eligible(decisions)} ORDER BY r.date, r.ref")
        for part in _chunks(unique):
            query = sql.format(", ".join("?" * len(part)))
            for fp, date, row_id in self.db.execute(query, (*part, *decisions, before)):
                found.setdefault(fp, (date, row_id))
        return found

    def band_candidates(self, keys: np.ndarray, before: str,
                        decisions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[HistoryRow]]:
        """Pairs (batch row, history row) sharing at least one LSH band key, the history row eligible.

        Returns ``(items, slots, candidates)``: pair k joins batch row ``items[k]`` and ``candidates[slots[k]]``;
        candidates are the distinct eligible history rows (each with its signature) in (date, ref) order, and the
        pairs are sorted by item, then candidate. One indexed join finds the pairs (the batch's keys passed as one
        JSON array: 4x faster than inserting them into a temporary table first); signatures are read once per
        distinct history row.
        """
        bands = keys.shape[1]
        # the keys travel as one JSON array (json_each reads it in C): the item of key k is k // bands
        pairs = np.array(self.db.execute(
            "SELECT DISTINCT j.key / ?, b.ref FROM json_each(?) j JOIN bands b ON b.key = j.value",
            (bands, _json_array(keys))).fetchall(), dtype=np.int64).reshape(-1, 2)
        eligible: dict[int, HistoryRow] = {}
        sql = ("SELECT r.ref, r.date, r.row_id, r.decision, r.signature FROM rows r WHERE r.ref IN ({}) AND "
               f"{self._eligible(decisions)}")
        for part in _chunks(np.unique(pairs[:, 1]).tolist()):
            for ref, date, row_id, decision, blob in self.db.execute(
                sql.format(", ".join("?" * len(part))), (*part, *decisions, before)
            ):
                eligible[ref] = HistoryRow(ref, date, row_id, decision, np.frombuffer(blob, dtype=np.uint32))
        candidates = sorted(eligible.values(), key=lambda row: (row.date, row.ref))
        slot_of = {row.ref: slot for slot, row in enumerate(candidates)}
        pairs = pairs[np.isin(pairs[:, 1], np.fromiter(slot_of, dtype=np.int64, count=len(slot_of)))]
        slots = np.fromiter((slot_of[ref] for ref in pairs[:, 1].tolist()), dtype=np.int64, count=len(pairs))
        order = np.lexsort((slots, pairs[:, 0]))
        return pairs[order, 0], slots[order], candidates

    def decisions(self, date: str) -> dict[str, tuple[str, str | None]]:
        """row id -> (decision, version) of the rows of ``date``."""
        query = "SELECT row_id, decision, version FROM rows WHERE date = ?"
        return {row_id: (decision, version) for row_id, decision, version in self.db.execute(query, (date,))}

    def sample_records(self, decision: str, count: int, seed: str, before: str | None = None,
                       after: str | None = None) -> list[dict[str, Any]]:
        """Up to ``count`` records with ``decision`` (dated before ``before`` and after ``after`` when given),
        drawn reproducibly."""
        bounds = [(" AND date < ?", before), (" AND date > ?", after)]
        query = ("SELECT ref FROM rows WHERE decision = ?" + "".join(sql for sql, value in bounds if value)
                 + " ORDER BY ref")
        refs = [ref for (ref,) in self.db.execute(query, (decision, *(value for _, value in bounds if value)))]
        chosen = sorted(random.Random(seed).sample(refs, min(count, len(refs))))
        records = []
        for part in _chunks(chosen):
            sql = f"SELECT record FROM rows WHERE ref IN ({', '.join('?' * len(part))}) ORDER BY ref"
            records += [json.loads(text) for (text,) in self.db.execute(sql, part)]
        return records

    # -- writing ----------------------------------------------------------------------------------------------
    def new_rows(self, records: Sequence[dict[str, Any]]) -> list[NewRow]:
        """Fingerprints, signatures and band keys of records (nothing is written)."""
        signatures = self.hasher.signatures([record_text(r) for r in records])
        keys = band_keys(signatures, self.dedup.bands)
        return [NewRow(str(r["id"]), record_fingerprint(r), signatures[i], keys[i], r)
                for i, r in enumerate(records)]

    def replace_day(self, date: str, rows: Sequence[NewRow], initial: str = PENDING,
                    version: str | None = None) -> dict[str, int]:
        """Make the history's rows of ``date`` exactly ``rows``, in one transaction.

        A row already present with the same fingerprint keeps its decision (a rerun of a promoted day does not
        forget what was trained); rows no longer present are removed; new rows start as ``initial``.
        """
        existing = {row_id: (ref, fp) for ref, row_id, fp in
                    self.db.execute("SELECT ref, row_id, fingerprint FROM rows WHERE date = ?", (date,))}
        keep_ids = {row.row_id for row in rows}
        stale = [ref for row_id, (ref, fp) in existing.items()
                 if row_id not in keep_ids]
        stale += [existing[row.row_id][0] for row in rows
                  if row.row_id in existing and existing[row.row_id][1] != row.fingerprint]
        fresh = [row for row in rows if row.row_id not in existing or existing[row.row_id][1] != row.fingerprint]
        with self.transaction() as db:
            for part in _chunks(stale):
                marks = ", ".join("?" * len(part))
                old = db.execute(f"SELECT ref, signature FROM rows WHERE ref IN ({marks})", part).fetchall()
                if old:
                    old_keys = band_keys(np.stack([np.frombuffer(b, dtype=np.uint32) for _, b in old]),
                                         self.dedup.bands)
                    db.executemany("DELETE FROM bands WHERE key = ? AND ref = ?",
                                   _band_rows([ref for ref, _ in old], old_keys))
                db.execute(f"DELETE FROM rows WHERE ref IN ({marks})", part)
            # the refs SQLite would pick one by one (max + 1), given up front so one executemany inserts them all
            first = db.execute("SELECT COALESCE(MAX(ref), 0) FROM rows").fetchone()[0] + 1
            refs = list(range(first, first + len(fresh)))
            texts = encode_jsonl([row.record for row in fresh]).split(b"\n")[:-1]  # dumps_record's, in one call
            db.executemany(
                "INSERT INTO rows (ref, date, row_id, fingerprint, signature, decision, version, record) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(ref, date, row.row_id, row.fingerprint, row.signature.astype(np.uint32).tobytes(), initial,
                  version, text.decode("utf-8")) for ref, row, text in zip(refs, fresh, texts, strict=True)],
            )
            if fresh:  # the refs are consecutive: key k of the JSON array belongs to ref first + k // bands
                keys = np.stack([row.keys for row in fresh])
                # inserted in the index's order (ORDER BY): a B-tree takes sorted inserts ~40% faster than the
                # random order of hash keys (two MedQuAD days of 6,600 rows: 0.31 -> 0.19 s)
                db.execute("INSERT OR IGNORE INTO bands SELECT j.value, ? + j.key / ? FROM json_each(?) j "
                           "ORDER BY 1, 2", (first, keys.shape[1], _json_array(keys)))
        return {"inserted": len(fresh), "removed": len(stale), "kept": len(rows) - len(fresh)}

    def set_decisions(self, date: str, decisions: dict[str, tuple[str, str | None]],
                      protected: Iterable[str] = (TRAINED,)) -> int:
        """Record select's decisions for rows of ``date``; rows already ``protected`` (trained) keep theirs."""
        protected = tuple(protected)
        marks = ", ".join("?" * len(protected))
        with self.transaction() as db:
            changed = 0
            for row_id, (decision, version) in sorted(decisions.items()):
                cursor = db.execute(
                    f"UPDATE rows SET decision = ?, version = ? WHERE date = ? AND row_id = ? "
                    f"AND decision NOT IN ({marks})",
                    (decision, version, date, row_id, *protected),
                )
                changed += cursor.rowcount
        return changed

    def mark_trained(self, date: str, version: str) -> int:
        """Promote: the rows of ``date`` selected for training are now trained into ``version``."""
        with self.transaction() as db:
            return db.execute("UPDATE rows SET decision = ?, version = ? WHERE date = ? AND decision = ?",
                              (TRAINED, version, date, SELECTED)).rowcount

    def mark_not_trained(self, date: str) -> int:
        """Keep: the rows of ``date`` selected for training were not promoted; a later day may select them."""
        with self.transaction() as db:
            return db.execute("UPDATE rows SET decision = ?, version = NULL WHERE date = ? AND decision = ?",
                              (NOT_TRAINED, date, SELECTED)).rowcount

    def seed_reference(self, records: Sequence[dict[str, Any]]) -> int:
        """Enter rows the base model was trained on as trained in v0 (once; later calls change nothing)."""
        if self.db.execute("SELECT 1 FROM rows WHERE date = ? LIMIT 1", (REFERENCE_DATE,)).fetchone():
            return 0
        return self.replace_day(REFERENCE_DATE, self.new_rows(records), initial=TRAINED,
                                version=BASE_VERSION)["inserted"]

    # -- the L_out cache ----------------------------------------------------------------------------------------
    def cached_losses(self, output_shas: Sequence[str], proxy_version: str) -> dict[str, tuple[float, int]]:
        found: dict[str, tuple[float, int]] = {}
        unique = sorted(set(output_shas))
        for part in _chunks(unique):
            sql = (f"SELECT output_sha, loss, tokens FROM output_loss WHERE proxy_version = ? "
                   f"AND output_sha IN ({', '.join('?' * len(part))})")
            found.update({sha: (loss, tokens) for sha, loss, tokens in self.db.execute(sql, (proxy_version, *part))})
        return found

    def store_losses(self, losses: dict[str, tuple[float, int]], proxy_version: str) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO output_loss VALUES (?, ?, ?, ?)",
                           ((sha, proxy_version, loss, tokens) for sha, (loss, tokens) in sorted(losses.items())))


def _json_array(keys: np.ndarray) -> str:
    """The band keys as one flat JSON array for ``json_each``: msgspec's encoder writes integers 3-4x faster than
    ``json.dumps`` (a day's 22,000 keys: 0.8 ms, not 3 ms), and as text, since SQLite reads a BLOB as JSONB."""
    import msgspec

    return msgspec.json.encode(keys.ravel().tolist()).decode("ascii")


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """Slices of at most _IN_LIST values: SQLite caps the parameters of one statement."""
    for start in range(0, len(values), _IN_LIST):
        yield values[start : start + _IN_LIST]


def _band_rows(refs: Sequence[int], keys: np.ndarray) -> list[tuple[int, int]]:
    """(key, ref) rows of the bands table, sorted by key (inserts in index order are the cheapest)."""
    ref_column = np.repeat(np.asarray(refs, dtype=np.int64), keys.shape[1])
    order = np.argsort(keys.ravel(), kind="stable")
    return list(zip(keys.ravel()[order].tolist(), ref_column[order].tolist(), strict=True))

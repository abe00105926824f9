"""The demo world's daily stream: raw instruction files with a hidden truth for every line.

Each day mixes, by the shares in ``world.mix``: rows introducing new facts, paraphrases of facts the base model
knows, paraphrases of facts introduced on earlier days, exact and near duplicates, malformed lines and rows with
PHI-like strings. Day ``d`` depends only on the seed and days ``1..d``: generating more days later never changes
the days already written. The truth (``world/truth/D.jsonl``) is for benchmarks and tests; the pipeline never
reads it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ctune_ops.config import WorldConfig
from ctune_ops.world.knowledge import Fact, KnowledgeBase, active_specialties, render
from ctune_ops.world.templates import NEAR_DUP_PREFIXES, NEAR_DUP_SUFFIXES

KINDS = ("new", "known", "earlier", "duplicate", "malformed", "phi")
CLEAN_KINDS = ("new", "known", "earlier")
MALFORMED_KINDS = (
    "bad_json", "missing_field", "blank_text", "overlong", "invalid_utf8", "not_object", "wrong_type",
)
PHI_KINDS = ("phone", "email", "ssn", "mrn")
SOURCES = ("clinic-faq", "pharmacy-notes", "textbook-qa", "nurse-line", "ehr-export")
NEAR_DUP_MIN_JACCARD = 0.9  # word 3-shingles; the generator only emits near duplicates at least this close
SHINGLE_WORDS = 3
PATIENT_NAMES = ("Ana Lopez", "Tom Becker", "Mei Chen", "Omar Haddad", "Lena Novak", "Raj Patel", "Eva Stone")
BOM = b"\xef\xbb\xbf"
_WORDS = re.compile(r"\w+")


def word_shingles(text: str, size: int = SHINGLE_WORDS) -> set[str]:
    """Lower-cased word n-grams of ``text`` (the whole text if it has fewer than ``size`` words)."""
    words = _WORDS.findall(text.lower())
    if len(words) < size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: dict[str, str], b: dict[str, str]) -> float:
    """Exact Jaccard similarity of two records' word shingles (instruction, input and output together)."""
    sa = word_shingles(" ".join((a["instruction"], a["input"], a["output"])))
    sb = word_shingles(" ".join((b["instruction"], b["input"], b["output"])))
    return len(sa & sb) / len(sa | sb)


@dataclass
class Entry:
    """One raw line before it is placed in a file: a record (or raw bytes) and its truth."""

    kind: str
    record: dict[str, Any] | None
    truth: dict[str, Any]
    raw: bytes | None = None  # malformed lines carry their bytes
    original: Entry | None = None  # duplicates: the row they copy (same day)
    id: str = ""

    def line_bytes(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass
class DayBatch:
    date: str
    day: int
    files: dict[str, bytes]
    truth: list[dict[str, Any]]
    new_facts: list[str]


def day_counts(world: WorldConfig, day: int) -> dict[str, int]:
    """Rows of each kind on ``day``; on day 1 the earlier-day share goes to known facts (no earlier day yet)."""
    shares = world.mix.model_dump()
    if day == 1:
        shares["known"] += shares["earlier"]
        shares["earlier"] = 0.0
    total = world.rows_per_day
    exact = {kind: shares[kind] * total for kind in KINDS}
    counts = {kind: int(exact[kind]) for kind in KINDS}
    by_remainder = sorted(KINDS, key=lambda k: (exact[k] - counts[k], -KINDS.index(k)), reverse=True)
    for kind in by_remainder[: total - sum(counts.values())]:
        counts[kind] += 1
    spare = counts["new"] % world.rows_per_new_fact  # new facts come in whole groups of rows
    counts["new"] -= spare
    counts["known"] += spare
    return counts


@dataclass
class _StreamState:
    """What carries over from day to day: pools consumed in a fixed order, so earlier days never change."""

    known_rows: list[tuple[Fact, int, int]]
    known_cursor: int = 0
    introduced: dict[str, int] = field(default_factory=dict)  # fact id -> day
    earlier_pool: list[tuple[Fact, int, int]] = field(default_factory=list)
    history: list[Entry] = field(default_factory=list)  # clean rows of earlier days (duplicate sources)


class StreamGenerator:
    """Generates days 1, 2, ... in order; call :meth:`next_day` once per day."""

    def __init__(self, world: WorldConfig, kb: KnowledgeBase, dates: list[str]) -> None:
        self.world, self.kb, self.dates = world, kb, dates
        rng = random.Random(f"ctune-world:{world.seed}:known-rows")
        pool = []
        for fact in kb.known:
            questions, answers = fact.wordings("reappear", world)
            pool += [(fact, q, a) for q in questions for a in answers]
        rng.shuffle(pool)
        self.state = _StreamState(known_rows=pool)
        self.day = 0

    # -- clean rows -----------------------------------------------------------------------------------------
    def _record(self, rng: random.Random, date: str, fact: Fact, question: int, answer: int) -> dict[str, Any]:
        text = render(fact, question, answer)
        return {
            "id": "", **text,
            "source": rng.choice(SOURCES),
            "created_at": f"{date}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z",
        }

    def _clean(self, rng: random.Random, date: str, kind: str, fact: Fact, q: int, a: int) -> Entry:
        truth = {
            "kind": kind, "fact_id": fact.id, "relation": fact.relation, "question": q, "answer": a,
            "day_introduced": self.state.introduced.get(fact.id, 0),
        }
        return Entry(kind, self._record(rng, date, fact, q, a), truth)

    def _new_rows(self, rng: random.Random, date: str, count: int) -> tuple[list[Entry], list[str]]:
        facts_needed = count // self.world.rows_per_new_fact
        active = set(active_specialties(self.kb, self.world, self.day))
        fresh = [f for f in self.kb.new_queue if f.id not in self.state.introduced and f.specialty in active]
        if len(fresh) < facts_needed:
            raise ValueError(
                f"day {self.day}: {facts_needed} new facts needed but only {len(fresh)} left in active specialties; "
                "raise world.entities or lower world.rows_per_day"
            )
        entries, chosen = [], fresh[:facts_needed]
        for fact in chosen:
            self.state.introduced[fact.id] = self.day
            questions, answers = fact.wordings("train", self.world)
            for j in range(self.world.rows_per_new_fact):
                q, a = questions[j % len(questions)], answers[j % len(answers)]
                entries.append(self._clean(rng, date, "new", fact, q, a))
        return entries, [f.id for f in chosen]

    def _release(self, fact_ids: list[str]) -> None:
        """Make today's new facts available as earlier-day facts from tomorrow on."""
        for fact_id in fact_ids:
            fact = self.kb.facts[fact_id]
            questions, answers = fact.wordings("reappear", self.world)
            self.state.earlier_pool += [(fact, q, a) for q in questions for a in answers]

    def _known_rows(self, rng: random.Random, date: str, count: int) -> list[Entry]:
        pool, start = self.state.known_rows, self.state.known_cursor
        if start + count > len(pool):
            raise ValueError(
                f"day {self.day}: the known-fact paraphrases are used up ({len(pool)} in all); "
                "raise world.known_facts or lower world.rows_per_day"
            )
        self.state.known_cursor += count
        return [self._clean(rng, date, "known", f, q, a) for f, q, a in pool[start : start + count]]

    def _earlier_rows(self, rng: random.Random, date: str, count: int) -> list[Entry]:
        pool = self.state.earlier_pool
        if count > len(pool):
            raise ValueError(
                f"day {self.day}: {count} earlier-day rows needed but only {len(pool)} unused paraphrases of "
                "earlier facts exist; lower world.mix.earlier or raise world.rows_per_new_fact"
            )
        picks = sorted(rng.sample(range(len(pool)), count), reverse=True)
        chosen = [pool.pop(i) for i in picks]
        return [self._clean(rng, date, "earlier", f, q, a) for f, q, a in chosen]

    # -- noise ----------------------------------------------------------------------------------------------
    def _duplicates(self, rng: random.Random, today: list[Entry], count: int) -> list[Entry]:
        entries = []
        for _ in range(count):
            cross_day = bool(self.state.history) and rng.random() < 0.3
            original = rng.choice(self.state.history if cross_day else today)
            record = dict(original.record or {})
            subkind = "exact" if rng.random() < 0.5 else "near"
            truth: dict[str, Any] = {
                "kind": "duplicate", "subkind": subkind, "of_kind": original.kind,
                "fact_id": original.truth.get("fact_id"), "cross_day": cross_day,
            }
            if subkind == "near":
                edit, record = _near_copy(rng, record)
                truth["edit"] = edit
            truth["jaccard"] = round(jaccard(record, original.record or {}), 4)
            record["source"] = rng.choice(SOURCES)
            entry = Entry("duplicate", record, truth, original=None if cross_day else original)
            if cross_day:
                truth["duplicate_of"] = original.id
            entries.append(entry)
        return entries

    def _random_known(self, rng: random.Random, date: str) -> tuple[Fact, dict[str, Any]]:
        fact = rng.choice(self.kb.known)
        return fact, self._record(rng, date, fact, rng.choice(fact.questions), rng.choice(fact.answers))

    def _malformed(self, rng: random.Random, date: str, count: int) -> list[Entry]:
        kinds = [MALFORMED_KINDS[(i + self.day) % len(MALFORMED_KINDS)] for i in range(count)]
        entries = []
        for subkind in kinds:
            fact, record = self._random_known(rng, date)
            raw, record = _break(rng, subkind, record, self.world.overlong_chars)
            entries.append(Entry("malformed", record, {"kind": "malformed", "subkind": subkind}, raw=raw))
        return entries

    def _phi(self, rng: random.Random, date: str, count: int) -> list[Entry]:
        entries = []
        for i in range(count):
            subkind = PHI_KINDS[(i + self.day) % len(PHI_KINDS)]
            fact, record = self._random_known(rng, date)
            phrase = _phi_phrase(rng, subkind)
            if record["input"] or rng.random() < 0.5:
                record["input"] = f"{record['input']} ({phrase})".strip() if record["input"] else phrase
            else:
                record["instruction"] = f"{record['instruction']} {phrase}"
            truth = {"kind": "phi", "subkind": subkind, "fact_id": fact.id, "relation": fact.relation}
            entries.append(Entry("phi", record, truth))
        return entries

    # -- a day ----------------------------------------------------------------------------------------------
    def next_day(self) -> DayBatch:
        self.day += 1
        date = self.dates[self.day - 1]
        rng = random.Random(f"ctune-world:{self.world.seed}:day:{self.day}")
        counts = day_counts(self.world, self.day)
        new, new_ids = self._new_rows(rng, date, counts["new"])
        clean = new + self._known_rows(rng, date, counts["known"]) + self._earlier_rows(rng, date, counts["earlier"])
        entries = clean + self._duplicates(rng, clean, counts["duplicate"])
        entries += self._malformed(rng, date, counts["malformed"]) + self._phi(rng, date, counts["phi"])
        rng.shuffle(entries)
        position = {id(e): i for i, e in enumerate(entries)}
        for entry in list(entries):  # a duplicate always comes after the row it copies ("keep the first")
            if entry.original is not None and position[id(entry.original)] > position[id(entry)]:
                i, j = position[id(entry)], position[id(entry.original)]
                entries[i], entries[j] = entries[j], entries[i]
                position[id(entries[i])], position[id(entries[j])] = i, j
        for number, entry in enumerate(entries):
            entry.id = f"{date}-{number:05d}"
            if entry.record is not None:
                entry.record["id"] = entry.id
            if entry.raw is not None:  # malformed lines were dumped with an empty id; truncation keeps it
                entry.raw = entry.raw.replace(b'"id":""', f'"id":"{entry.id}"'.encode(), 1)
            if entry.original is not None:
                entry.truth["duplicate_of"] = entry.original.id
        files, truth = self._write_files(entries, date)
        self.state.history += clean
        self._release(new_ids)
        return DayBatch(date, self.day, files, truth, new_ids)

    def _write_files(self, entries: list[Entry], date: str) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
        count = self.world.files_per_day
        size = -(-len(entries) // count)
        files: dict[str, bytes] = {}
        truth: list[dict[str, Any]] = []
        for index in range(count):
            chunk = entries[index * size : (index + 1) * size]
            name = f"part-{index:03d}.jsonl"
            windows = index == 1 and self.day % 2 == 0  # some producers send CRLF files with a byte-order mark
            newline = b"\r\n" if windows else b"\n"
            lines = [e.line_bytes() for e in chunk]
            body = newline.join(lines)
            if chunk and chunk[-1].truth.get("subkind") != "bad_json":
                body += newline  # a truncated last line has no newline, as when an upload is cut off
            files[name] = (BOM if windows else b"") + body
            for line, entry in enumerate(chunk, start=1):
                truth.append({"file": name, "line": line, "id": entry.id, **entry.truth})
        return files, truth


def _near_copy(rng: random.Random, record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A copy of ``record`` with one small edit that keeps its word shingles at least 0.9 similar."""
    edits: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("prefix", lambda r: r.update(instruction=f"{rng.choice(NEAR_DUP_PREFIXES)} {r['instruction']}")),
        ("suffix", lambda r: r.update(instruction=f"{r['instruction']} {rng.choice(NEAR_DUP_SUFFIXES)}")),
        ("case", lambda r: r.update(instruction=r["instruction"].lower())),
        ("punctuation", lambda r: r.update(output=r["output"].rstrip(".") + "!")),
        ("whitespace", lambda r: r.update(output=r["output"].replace(" ", "  ", 2) + " ")),
    ]
    rng.shuffle(edits)
    for name, edit in edits:
        copy = dict(record)
        edit(copy)
        if jaccard(copy, record) >= NEAR_DUP_MIN_JACCARD:
            return name, copy
    raise AssertionError("no near-duplicate edit kept the shingles similar")  # case/punctuation always do


def _break(
    rng: random.Random, subkind: str, record: dict[str, Any], overlong_chars: int
) -> tuple[bytes, dict[str, Any] | None]:
    """Raw bytes of a malformed line of the given kind, made from a good record."""
    def dump(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    if subkind == "bad_json":
        text = dump(record)
        return text[: rng.randrange(len(text) // 3, len(text) - 2)], None
    if subkind == "missing_field":
        record = dict(record)
        del record[rng.choice(("output", "instruction"))]
        return dump(record), record
    if subkind == "blank_text":
        record = dict(record, **{rng.choice(("output", "instruction")): rng.choice(("", "   ", "\t \n"))})
        return dump(record), record
    if subkind == "overlong":
        unit = record["output"] + " "
        record = dict(record, output=(unit * (overlong_chars // len(unit) + 1))[:overlong_chars])
        return dump(record), record
    if subkind == "invalid_utf8":
        good = dump(record)
        cut = good.index(b'"output":"') + len(b'"output":"')
        return good[:cut] + b"\xff\xfe\xc3(" + good[cut:], None
    if subkind == "not_object":
        return dump([record["instruction"], record["output"]]), None
    if subkind == "wrong_type":
        record = dict(record, output=rng.choice(([record["output"]], 42, None, {"text": record["output"]})))
        return dump(record), record
    raise ValueError(f"unknown malformed kind {subkind}")


def _phi_phrase(rng: random.Random, subkind: str) -> str:
    name = rng.choice(PATIENT_NAMES)
    digits = lambda n: "".join(str(rng.randrange(10)) for _ in range(n))  # noqa: E731
    if subkind == "phone":
        style = rng.randrange(3)
        number = (f"({digits(3)}) {digits(3)}-{digits(4)}", f"{digits(3)}-{digits(3)}-{digits(4)}",
                  f"+1 {digits(3)} {digits(3)} {digits(4)}")[style]
        return f"Patient {name}, call back at {number}."
    if subkind == "email":
        return f"Reply to {name.split()[0].lower()}.{name.split()[1].lower()}{digits(2)}@example.org please."
    if subkind == "ssn":
        return f"Patient {name}, SSN {digits(3)}-{digits(2)}-{digits(4)}."
    return f"Patient {name}, MRN{rng.choice((' ', ': ', '# '))}{digits(8)}."

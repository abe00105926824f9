"""Robust reading (ctune_ops.ingest) and the batch helpers of records.py: every unit comes out, numbered."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

import pytest

from ctune_ops.ingest import (
    DayFolderMissing,
    FileStats,
    Problem,
    day_files,
    decode_unit,
    file_format,
    iter_units,
    raw_fields,
    record_decoder,
)
from ctune_ops.records import dumps_record, encode_jsonl, holds_float, normalize_column, normalize_text

GOOD = b'{"id":"a","instruction":"Q?","input":"","output":"A."}'


def units(path: Path) -> tuple[list[tuple[int, bytes | Problem]], FileStats]:
    stats = FileStats(path.name, file_format(path.name) or "unsupported")
    return list(iter_units(path, stats)), stats


def test_file_formats() -> None:
    assert file_format("a.jsonl") == "jsonl" and file_format("a.NDJSON") == "jsonl" and file_format("a.json") == "jsonl"
    assert file_format("a.jsonl.gz") == "jsonl.gz" and file_format("a.parquet") == "parquet"
    assert file_format("a.csv") is None and file_format("a.txt.gz") is None


def test_bom_crlf_blank_lines_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n   \r\n" + GOOD + b"\r\n")
    got, stats = units(path)
    assert got == [(1, GOOD), (4, GOOD)]
    assert stats.bom and stats.crlf_lines == 4 and stats.blank_lines == 2 and stats.units == 2
    assert not stats.unterminated_last_line


def test_truncated_last_line_is_a_unit(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(GOOD + b"\n" + GOOD[:20])
    got, stats = units(path)
    assert got == [(1, GOOD), (2, GOOD[:20])] and stats.unterminated_last_line and stats.lines == 2
    assert isinstance(decode_unit(GOOD[:20]), Problem)


def test_empty_file_has_no_units(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"")
    assert units(path)[0] == []


def test_json_array_file_is_one_bad_unit(tmp_path: Path) -> None:
    path = tmp_path / "array.json"
    path.write_text(json.dumps([json.loads(GOOD), json.loads(GOOD)], indent=2))
    got, stats = units(path)
    assert len(got) == 1 and got[0][0] == 1 and stats.units == 1
    problem = got[0][1]
    assert isinstance(problem, Problem) and problem.reason == "not_json_lines"
    assert "JSON array of 2 item(s)" in problem.message and problem.raw == path.read_bytes()


def test_pretty_printed_object_is_one_bad_unit(tmp_path: Path) -> None:
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps(json.loads(GOOD), indent=2) + "\n")
    (_, problem), = units(path)[0]
    assert problem.reason == "not_json_lines" and "JSON dict" in problem.message


def test_json_lines_starting_with_an_array_line_stay_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b'["not", "an object"]\n' + GOOD + b"\n")
    assert [n for n, _ in units(path)[0]] == [1, 2]
    single = tmp_path / "single.jsonl"
    single.write_bytes(b"[" + GOOD + b"," + GOOD + b"]")
    (number, unit), = units(single)[0]
    assert number == 1 and isinstance(unit, bytes) and isinstance(decode_unit(unit), list)


def test_gzip_and_a_damaged_gzip(tmp_path: Path) -> None:
    good = tmp_path / "g.jsonl.gz"
    good.write_bytes(gzip.compress(GOOD + b"\n" + GOOD + b"\n"))
    assert units(good)[0] == [(1, GOOD), (2, GOOD)]
    data = gzip.compress((GOOD + b"\n") * 2000)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    got, stats = units(bad)
    problem = got[-1][1]
    assert isinstance(problem, Problem) and problem.reason == "corrupt_file"
    assert got[-1][0] == stats.lines + 1 and stats.notes
    assert len({n for n, _ in got}) == len(got)  # unique line numbers
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(GOOD)
    (number, problem), = units(not_gzip)[0]
    assert number == 1 and problem.reason == "corrupt_file"


def test_parquet_rows_are_units(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": ["p1", "p2", None],
        "instruction": ["Q1?", "Q2?", "Q3?"],
        "output": ["A1.", None, "A3."],
        "created_at": [dt.datetime(2026, 2, 1, 8, 30), None, None],
        "score": [1.5, float("nan"), None],
    })
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path)
    got, stats = units(path)
    assert [n for n, _ in got] == [1, 2, 3] and stats.units == 3
    first = decode_unit(got[0][1])
    assert first == {"id": "p1", "instruction": "Q1?", "output": "A1.", "created_at": "2026-02-01T08:30:00",
                     "score": 1.5}
    second = decode_unit(got[1][1])  # null (and NaN in a float column) = absent: Parquet cannot tell them apart
    assert "output" not in second and "score" not in second
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    (number, problem), = units(broken)[0]
    assert number == 1 and problem.reason == "corrupt_file"


def test_unsupported_entries(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("id,instruction\n1,x\n")
    (number, problem), = units(csv)[0]
    assert number == 1 and problem.reason == "unsupported_file" and "rows.csv" in problem.message
    folder = tmp_path / "sub.jsonl"
    folder.mkdir()
    (_, problem), = units(folder)[0]
    assert problem.reason == "unsupported_file" and "folder" in problem.message


def test_day_files_order_hidden_and_missing(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", ".partial.tmp", "C.jsonl"):
        (tmp_path / name).write_bytes(GOOD)
    paths, hidden = day_files(tmp_path)
    assert [p.name for p in paths] == ["C.jsonl", "a.jsonl", "b.jsonl"] and hidden == [".partial.tmp"]
    with pytest.raises(DayFolderMissing, match=re.escape(str(tmp_path / "nope"))):
        day_files(tmp_path / "nope")


@pytest.mark.parametrize(("raw", "reason"), [
    (b'{"a":"x\x00"}', "nul_bytes"),
    (b"\x00\x00\x00\x00", "nul_bytes"),
    (b'{"a":"\xff\xfe"}', "invalid_utf8"),
    (b'{"a":', "invalid_json"),
    (b'{"a":NaN}', "invalid_json"),
    (b'{"a":1e400}', "invalid_json"),
    (b'{"a":"\\ud800"}', "invalid_unicode"),
    (b"[" * 100_000, "invalid_json"),
    (b'{"a":1} {"b":2}', "invalid_json"),
])
def test_decode_problems(raw: bytes, reason: str) -> None:
    problem = decode_unit(raw)
    assert isinstance(problem, Problem) and problem.reason == reason and problem.raw == raw


def test_decode_keeps_json_semantics() -> None:
    assert decode_unit(b'{"a":1,"a":2}') == {"a": 2}
    assert decode_unit(b'{"n":123456789012345678901234567890}') == {"n": 123456789012345678901234567890}
    assert decode_unit(b'{"e":"\\ud83d\\ude00"}') == {"e": "\U0001F600"}
    assert decode_unit(b"[1,2]") == [1, 2] and decode_unit(b"42") == 42


def test_fast_record_decoder_agrees_with_decode_unit() -> None:
    fast = record_decoder()
    good = [GOOD, b'{"id":null,"output":"x"}', b'{"id":"a","id":"b","instruction":"\\u00e9"}', b"{}"]
    for raw in good:
        row = fast(raw)
        full = decode_unit(raw)
        assert {k: getattr(row, k) for k in full} == full
    for raw in (b'{"id":1}', b'{"id":"a","extra":1}', b'{"meta":{}}', b"[1]", b'{"a":"\xff"}', b'{"id":"\\ud800"}'):
        with pytest.raises(ValueError):
            fast(raw)


def test_raw_fields() -> None:
    assert raw_fields(b'{"a":1}') == {"raw": '{"a":1}'}
    assert raw_fields(b"\xff") == {"raw_base64": "/w=="}
    assert raw_fields(None) == {}


# -- records.py batch helpers --------------------------------------------------------------------------------
_SPACES = re.compile(r"[^\S\n]+")


def _reference_normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def test_normalize_text_and_column_match_the_reference() -> None:
    whitespace = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    alphabet = whitespace + list("ab\u0301e\u00e9\u212b\x00\x7f") + ["  ", "\r\n", "\n\n\n"]
    rng = random.Random(0)
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(20_000)] + [None]
    expected = [None if v is None else _reference_normalize(v) for v in values]
    assert [None if v is None else normalize_text(v) for v in values] == expected
    listed, array = normalize_column(values)
    assert listed == expected and array.to_pylist() == expected


def test_encode_jsonl_matches_dumps_record() -> None:
    rng = random.Random(1)
    pool = [None, 'q"b{}\\\n\u2028é\x00😀\x7f', 3, 2**70, 2.5, 1e16, 1e-7, True, [1, "x", None], {"z": 1, "a": [{}]},
            {"f": [0.1]}, {}, ""]
    keys = ["id", "instruction", "input", "output", "source", "created_at", "meta", "provenance", "zeta", "al{p}ha"]
    records = [{k: rng.choice(pool) for k in rng.sample(keys, rng.randrange(len(keys)))} for _ in range(3000)]
    expected = "".join(dumps_record(r) + "\n" for r in records).encode()
    assert encode_jsonl(records) == expected
    floats = [i for i, r in enumerate(records) if holds_float(r)]
    assert floats and encode_jsonl(records, float_rows=floats) == expected
    assert encode_jsonl([]) == b"" and encode_jsonl([{}]) == b"{}\n"
    every_char = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert encode_jsonl([{"t": every_char}], float_rows=()) == (dumps_record({"t": every_char}) + "\n").encode()


def test_token_counter_certifies_only_byte_level_bpe(tmp_path: Path) -> None:
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ctune_ops.validation.tokens import TokenCounter, TokenizerMissing, _structure, load_token_counter

    from .validate_support import train_small_tokenizer

    bpe = train_small_tokenizer(tmp_path / "bpe")
    counter = load_token_counter(str(bpe), "models/base", local=True)
    assert counter.byte_bounded and counter.method == "byte-bound" and counter.longest_token_bytes > 1
    text = "Raneoxin treats Brizior palsy, 10 mg twice daily. é✓"
    (n,) = counter.count([text])
    n_bytes = len(text.encode())
    assert -(-n_bytes // counter.longest_token_bytes) <= n <= n_bytes + 1  # the bounds the stage relies on
    assert counter.certified(np.array([n_bytes]), 1, n_bytes + 1).tolist() == [True]
    assert counter.certified(np.array([n_bytes]), 1, n_bytes).tolist() == [False]

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "dose": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    assert _structure(word_level) == (False, 0)
    exact = TokenCounter(word_level, "w", False, 0)
    assert exact.method == "exact" and exact.count(["dose dose x"]) == [3]
    assert exact.certified(np.array([5]), 1, 100).tolist() == [False]

    with pytest.raises(TokenizerMissing, match="does not exist"):
        load_token_counter(str(tmp_path / "absent"), "models/base", local=True)

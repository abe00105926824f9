"""The validate stage end to end: a corpus of bad inputs, each ending accepted or quarantined with the right reason,
nothing lost, reruns byte for byte, PHI caught or redacted, token bounds, and the demo world against its truth."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from ctune_ops.config import ConfigError, parse_config
from ctune_ops.records import read_jsonl
from ctune_ops.stages import StageError, run_stage
from ctune_ops.stages.validate import run as validate
from ctune_ops.workspace import Workspace, init_workspace

from .conftest import set_params
from .validate_support import install_tokenizer, line, outputs, placement, record, train_small_tokenizer, write_day

LONG_ROW_CHARS = 10 * 1024 * 1024
BIG_FILE_ROWS = 100_000


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer") / "base")


@pytest.fixture(scope="module")
def shared_ws(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Workspace:
    """One workspace for the tests that keep the default config; each uses its own date."""
    ws = init_workspace(tmp_path_factory.mktemp("validate") / "ws").workspace
    install_tokenizer(ws, tokenizer_dir)
    return ws


@pytest.fixture
def ws(workspace: Workspace, tokenizer_dir: Path) -> Workspace:
    """A fresh workspace with a tokenizer, for tests that change the config."""
    install_tokenizer(workspace, tokenizer_dir)
    return workspace


def _corpus() -> tuple[dict[str, bytes], dict[tuple[str, int], str]]:
    """Day files with one bad input of each kind, and where each unit must end up."""
    expect: dict[tuple[str, int], str] = {}
    lines: list[tuple[bytes, str]] = [
        (line(record("ok-1")), "accepted"),
        (line(record("extra-1", hospital="north", tags=["a"])), "accepted"),
        (line(record("extra-2", meta={"batch": 7}, ward="4B")), "accepted"),
        (b'{"id":"nul-1","output":"x\x00y"}', "nul_bytes"),
        (b"\x00" * 64, "nul_bytes"),
        (line(record("utf8-1"))[:-3] + b"\xff\xfe\"}", "invalid_utf8"),
        (b'{"id":"nan-1","output":NaN}', "invalid_json"),
        (b'{"id":"sur-1","instruction":"Q","output":"\\udc80"}', "invalid_unicode"),
        (line(["What is X?", "X is Y."]), "not_object"),
        (line("just a string"), "not_object"),
        (line(42), "not_object"),
        (b"null", "not_object"),
        (line(record("list-1", output=["It treats Brizior palsy."])), "wrong_type"),
        (line(record("num-1", output=42)), "wrong_type"),
        (line(record("int-id-1") | {"id": 7}), "wrong_type"),
        (line(record("meta-1", meta="not an object")), "wrong_type"),
        (line({k: v for k, v in record("miss-1").items() if k != "output"}), "missing_field"),
        (line({k: v for k, v in record("miss-2").items() if k != "instruction"}), "missing_field"),
        (line(record("null-1", output=None)), "missing_field"),
        (line({k: v for k, v in record("x").items() if k != "id"}), "missing_field"),
        (line(record("blank-1", output=" \t\n ")), "blank_field"),
        (line(record("blank-2", instruction="")), "blank_field"),
        (line(record("ctl-1", output="bell \u0007 here")), "control_chars"),
        (line(record("long-1", instruction="Why? " * 1000)), "length_chars"),
        (line(record("dup-1")), "accepted"),
        (line(record("dup-1", output="Another answer.")), "duplicate_id"),
        (line(record("phone-1", output="Call (555) 123-4567.")), "phi_phone"),
        (line(record("phone-2", output="Call 555-123-4567.")), "phi_phone"),
        (line(record("phone-3", output="Call +1 555 123 4567.")), "phi_phone"),
        (line(record("mail-1", output="Write to ana.lopez12@example.org.")), "phi_email"),
        (line(record("ssn-1", output="SSN 123-45-6789 on file.")), "phi_ssn"),
        (line(record("mrn-1", instruction="MRN 12345678: what dose?")), "phi_mrn"),
        (line(record("mrn-2", output="See MRN: 12345678.")), "phi_mrn"),
        (line(record("mrn-3", output="See MRN# 12345678.")), "phi_mrn"),
        (line(record("meta-phi", contact="ana@example.org")), "phi_email"),
        (line(record("tollfree-1", output="Call the helpline at 1-800-411-1222.")), "accepted"),
        (line(record("accent-1", output="Café naïve, call 555-123-4567 — tout de suite.")), "phi_phone"),
        (line(record("accent-2", output="Dose: 5 µg for the naïve patient, 1–2 times.")), "accepted"),
        (line(record("medical-1", output="Take 1-2 mg in 2019-2020; OMIM 123456; BRCA1; 850-4000 ng/mL.")),
         "accepted"),
        (b'{"id":"trunc-1","instruction":"What does Raneo', "invalid_json"),  # last line, no newline
    ]
    body = b"\n".join(raw for raw, _ in lines)
    for number, (_, where) in enumerate(lines, start=1):
        expect[("a-main.jsonl", number)] = where
    files = {"a-main.jsonl": body}

    files["b-windows.jsonl"] = b"\xef\xbb\xbf" + line(record("bom-1")) + b"\r\n" + line(record("crlf-1")) + b"\r\n"
    expect |= {("b-windows.jsonl", 1): "accepted", ("b-windows.jsonl", 2): "accepted"}
    files["c-array.json"] = json.dumps([record("arr-1"), record("arr-2")], indent=1).encode()
    expect[("c-array.json", 1)] = "not_json_lines"
    files["d-empty.jsonl"] = b""
    files["e-zipped.jsonl.gz"] = gzip.compress(line(record("gz-1")) + b"\n")
    expect[("e-zipped.jsonl.gz", 1)] = "accepted"
    files["f-notes.csv"] = b"id,instruction\n1,x\n"
    expect[("f-notes.csv", 1)] = "unsupported_file"
    files[".upload.tmp"] = b"half a file"  # hidden: transfer debris, skipped and reported
    return files, expect


def test_every_bad_input_ends_in_its_place(shared_ws: Workspace) -> None:
    date = "2026-02-01"
    files, expect = _corpus()
    write_day(shared_ws, date, files)
    result = validate(shared_ws, date)
    placed = placement(shared_ws, date)
    assert placed == expect
    accepted, quarantined, report = outputs(shared_ws, date)
    assert report["raw"] == len(expect) == report["accepted"] + report["quarantined"]
    assert result.summary["raw"] == len(expect) and result.summary["reasons"] == report["reasons"]
    assert report["reasons"] == dict(sorted(Counter(v for v in expect.values() if v != "accepted").items()))
    assert report["hidden_files_skipped"] == [".upload.tmp"]

    by_id = {r["id"]: r for r in accepted}
    assert by_id["extra-1"]["meta"] == {"hospital": "north", "tags": ["a"]}
    assert by_id["extra-2"]["meta"] == {"batch": 7, "ward": "4B"}
    assert by_id["ok-1"]["provenance"] == {"file": "a-main.jsonl", "line": 1}
    assert list(by_id["ok-1"]) == ["id", "instruction", "input", "output", "source", "created_at", "meta",
                                   "provenance"]
    assert by_id["dup-1"]["output"] == "It treats Brizior palsy."  # the first occurrence is kept
    entries = {(q["file"], q["line"]): q for q in quarantined}
    truncated = entries[("a-main.jsonl", len([k for k in expect if k[0] == "a-main.jsonl"]))]
    assert "cut off" in truncated["message"] and truncated["raw"].startswith('{"id":"trunc-1"')
    utf8 = next(q for q in quarantined if q["reason"] == "invalid_utf8")
    assert base64.b64decode(utf8["raw_base64"]).endswith(b"\xff\xfe\"}")
    duplicate = next(q for q in quarantined if q["reason"] == "duplicate_id")
    assert "a-main.jsonl:25" in duplicate["message"] and duplicate["id"] == "dup-1"
    assert duplicate["expectation"] == "expect_column_values_to_be_unique"
    assert duplicate["check"] == "duplicate_id" and duplicate["failed"] == ["duplicate_id"]
    long_row = next(q for q in quarantined if q["reason"] == "length_chars")
    assert "'instruction' has 4999 characters; allowed 2..2000" in long_row["message"]
    assert next(q for q in quarantined if q["reason"] == "wrong_type" and q["id"] == "list-1")["message"] == (
        "field 'output': expected a string, got array")
    meta_phi = next(q for q in quarantined if q.get("id") == "meta-phi")
    assert meta_phi["column"] == "meta:phi" and "'meta'" in meta_phi["message"]
    for entry in quarantined:
        assert entry["message"]
        if entry["reason"] == "unsupported_file":  # a whole file: it stays in incoming/, the entry names it
            assert entry["file"] in entry["message"] and "raw" not in entry
        else:
            assert entry.get("raw") is not None or entry.get("raw_base64") is not None

    gx = report["great_expectations"]
    assert gx["statistics"]["evaluated_expectations"] == len(gx["expectations"]) and not gx["success"]
    assert {e["reason"] for e in gx["expectations"] if not e["success"]} >= {"missing_field", "phi", "duplicate_id"}
    assert report["tokens"]["method"] == "byte-bound"


def test_rerun_gives_the_same_bytes(shared_ws: Workspace) -> None:
    date = "2026-02-02"
    files, _ = _corpus()
    write_day(shared_ws, date, files)

    def digest() -> list[str]:
        paths = (shared_ws.accepted(date), shared_ws.quarantine(date), shared_ws.reports(date) / "validation.json")
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]

    validate(shared_ws, date)
    first = digest()
    validate(shared_ws, date)
    assert digest() == first


def test_a_ten_megabyte_row_is_quarantined_whole(shared_ws: Workspace) -> None:
    date = "2026-02-03"
    big = record("huge-1", output="lorem ipsum " * (LONG_ROW_CHARS // 12))
    write_day(shared_ws, date, {"big.jsonl": line(record("small-1")) + b"\n" + line(big) + b"\n"})
    validate(shared_ws, date)
    assert placement(shared_ws, date) == {("big.jsonl", 1): "accepted", ("big.jsonl", 2): "length_chars"}
    _, quarantined, _ = outputs(shared_ws, date)
    assert json.loads(quarantined[0]["raw"]) == big  # nothing lost: the raw line is kept in full


def test_a_hundred_thousand_rows(shared_ws: Workspace) -> None:
    date = "2026-02-04"
    good = [line(record(f"r{i:06d}", output=f"Answer number {i}.")) for i in range(BIG_FILE_ROWS)]
    bad = {7: b"{oops", 50_000: line(record("r050000", output=[1])), 99_999: line(record("r000001"))}
    for index, raw in bad.items():
        good[index] = raw
    write_day(shared_ws, date, {"big.jsonl": b"\n".join(good) + b"\n"})
    result = validate(shared_ws, date)
    assert result.summary["raw"] == BIG_FILE_ROWS
    assert result.summary["reasons"] == {"duplicate_id": 1, "invalid_json": 1, "wrong_type": 1}
    assert result.summary["accepted"] == BIG_FILE_ROWS - 3
    placed = placement(shared_ws, date)
    assert len(placed) == BIG_FILE_ROWS and placed[("big.jsonl", 100_000)] == "duplicate_id"


def test_empty_and_missing_day_folders(shared_ws: Workspace) -> None:
    date = "2026-02-05"
    shared_ws.incoming(date).mkdir(parents=True)
    result = validate(shared_ws, date)
    assert result.summary == {"date": date, "raw": 0, "accepted": 0, "quarantined": 0, "reasons": {}}
    _, _, report = outputs(shared_ws, date)
    assert report["warnings"] == [f"incoming/{date} holds no data: nothing was validated"]
    assert shared_ws.accepted(date).read_bytes() == b"" == shared_ws.quarantine(date).read_bytes()
    with pytest.raises(StageError, match=r"day folder .*incoming/2026-02-06 does not exist"):
        validate(shared_ws, "2026-02-06")
    with pytest.raises(StageError, match="YYYY-MM-DD"):
        run_stage(shared_ws, "validate", "2026-2-6")


def test_only_bad_units(shared_ws: Workspace) -> None:
    date = "2026-02-07"
    write_day(shared_ws, date, {"x.jsonl": b"{bad\n[1]\n", "y.csv": b"a,b\n"})
    result = validate(shared_ws, date)
    assert result.summary["reasons"] == {"invalid_json": 1, "not_object": 1, "unsupported_file": 1}
    assert outputs(shared_ws, date)[2]["great_expectations"] == {"skipped": "no row parsed, nothing to validate"}


def test_redact_mode_masks_and_records(ws: Workspace) -> None:
    ws = set_params(ws, {"validate": {"phi": "redact"}})
    date = "2026-02-08"
    rows = [
        record("r1", output="Call (555) 123-4567 or mail ana@example.org; SSN 123-45-6789."),
        record("r2", instruction="MRN: 12345678 - what dose?", output="Helpline 1-800-411-1222."),
        record("r3"),
        record("r4", contact="555-123-4567"),  # PHI outside the text fields cannot be masked: quarantined
        record("r5", output="Café ‘naïve’: appelez le 555-123-4567."),
    ]
    write_day(ws, date, {"p.jsonl": b"\n".join(line(r) for r in rows) + b"\n"})
    result = validate(ws, date)
    assert result.summary["reasons"] == {"phi_phone": 1}
    accepted, _, report = outputs(ws, date)
    by_id = {r["id"]: r for r in accepted}
    assert by_id["r1"]["output"] == "Call [REDACTED:phone] or mail [REDACTED:email]; SSN [REDACTED:ssn]."
    assert by_id["r1"]["redactions"] == {"email": 1, "phone": 1, "ssn": 1}
    assert by_id["r2"]["instruction"] == "[REDACTED:mrn] - what dose?"
    assert by_id["r2"]["output"] == "Helpline 1-800-411-1222." and by_id["r2"]["redactions"] == {"mrn": 1}
    assert by_id["r3"]["redactions"] == {}
    assert by_id["r5"]["output"] == "Café ‘naïve’: appelez le [REDACTED:phone]."
    assert report["redacted_rows"] == 3 and report["redactions"] == {"email": 1, "mrn": 1, "phone": 2, "ssn": 1}


def test_token_bounds(ws: Workspace) -> None:
    from transformers import AutoTokenizer

    rows = [record("short"), record("wordy", output=" ".join(["Raneoxin is used for Brizior palsy."] * 6))]
    tokenizer = AutoTokenizer.from_pretrained(ws.root / "models" / "base")
    prompt = ws.config.models.prompt
    short, wordy = (len(tokenizer(prompt.render(r["instruction"]) + r["output"], add_special_tokens=False).input_ids)
                    for r in rows)
    limit = (short + wordy) // 2
    ws = set_params(ws, {"validate": {"max_tokens": limit}})
    date = "2026-02-09"
    write_day(ws, date, {"t.jsonl": b"\n".join(line(r) for r in rows) + b"\n"})
    validate(ws, date)
    assert placement(ws, date) == {("t.jsonl", 1): "accepted", ("t.jsonl", 2): "length_tokens"}
    _, quarantined, report = outputs(ws, date)
    assert f"are {wordy} tokens of models.base; allowed 1..{limit}" in quarantined[0]["message"]
    assert report["tokens"]["counted"] >= 1


def test_missing_tokenizer_fails_clearly_unless_bounds_are_off(workspace: Workspace) -> None:
    date = "2026-02-10"
    write_day(workspace, date, {"t.jsonl": line(record("a")) + b"\n"})
    with pytest.raises(StageError, match=r"models.base \('models/base'\) does not exist.*token_bounds: false"):
        validate(workspace, date)
    ws = set_params(workspace, {"validate": {"token_bounds": False}})
    result = validate(ws, date)
    assert result.summary["accepted"] == 1
    assert outputs(ws, date)[2]["tokens"] == {"method": "off (validate.token_bounds: false)"}


def test_optional_id_gets_one_from_its_place(ws: Workspace) -> None:
    ws = set_params(ws, {"validate": {"required": ["instruction", "output"]}})
    date = "2026-02-11"
    write_day(ws, date, {"n.jsonl": line({"instruction": "Q?", "output": "A."}) + b"\n"})
    validate(ws, date)
    assert outputs(ws, date)[0][0]["id"] == f"{date}:n.jsonl:1"


def test_bad_validate_config_is_named() -> None:
    with pytest.raises(ConfigError, match=r"validate.*phi pattern 'phone' is not a valid regular expression"):
        parse_config({"validate": {"phi_patterns": {"phone": "([0-9"}}})
    with pytest.raises(ConfigError, match="min_tokens"):
        parse_config({"validate": {"min_tokens": 10, "max_tokens": 5}})
    with pytest.raises(ConfigError, match="itself matches"):
        parse_config({"validate": {"phi_mask": "[{name} 555-123-4567]"}})
    with pytest.raises(ConfigError, match="empty string"):
        parse_config({"validate": {"phi_patterns": {"x": "[0-9]*"}}})
    with pytest.raises(ConfigError, match="combined"):
        parse_config({"validate": {"phi_patterns": {"a": "(?i)x", "b": "y"}}})


def test_demo_world_day_matches_its_truth(ws: Workspace) -> None:
    from ctune_ops.world.generate import generate_world

    generate_world(ws, days=2, commit=False)
    for date in ws.config.world.day_dates(2):
        validate(ws, date)
        truth = {(t["file"], t["line"]): t for t in read_jsonl(ws.world_dir / "truth" / f"{date}.jsonl")}
        placed = placement(ws, date)
        assert placed.keys() == truth.keys()
        for key, where in placed.items():
            kind = truth[key]["kind"]
            if kind == "phi":
                assert where == f"phi_{truth[key]['subkind']}", (key, truth[key])
            elif kind == "malformed":
                assert where != "accepted", (key, truth[key])
            else:
                assert where == "accepted", (key, truth[key], where)


def test_a_lost_row_fails_loudly_and_writes_nothing(shared_ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctune_ops.stages import validate as stage

    date = "2026-02-12"
    write_day(shared_ws, date, {"a.jsonl": line(record("a")) + b"\n" + line(record("b")) + b"\n"})
    decide = stage._decide

    def lossy(*args, **kwargs):
        accepted, quarantined = decide(*args, **kwargs)
        return accepted[1:], quarantined  # a bug that drops a row

    monkeypatch.setattr(stage, "_decide", lossy)
    with pytest.raises(stage.InvariantViolation, match=r"accepted 1 \+ quarantined 0 != raw 2.*a.jsonl', 1"):
        validate(shared_ws, date)
    assert not shared_ws.accepted(date).exists() and not (shared_ws.reports(date) / "validation.json").exists()

"""The Great Expectations suite of the validate stage, and the mapping of its failures back to rows.

GX 1.x is called from our own code (the GX Airflow provider does not install beside Airflow 3.3): an ephemeral
context, a pandas data source, expectations from ``great_expectations.expectations`` and
``result_format=COMPLETE`` so that every expectation returns the index of each row it rejects. The frame's index
is the row's position in the day, which is how a failure finds its file and line again.

The day is one DataFrame; every expectation is column-level and runs on a whole-dataframe batch of column slices
of it (see :func:`_batches`). GX filters the rows of its batch for each expectation (nulls out, unexpected rows
out); on the whole frame that copied every text column for every expectation, which cost more than everything
else in the stage together.

The suite is planned as plain data first (:class:`CheckSpec`, no GX import), so reasons, messages and the order in
which a row's failures are reported are testable and cheap; GX is imported only in :func:`run_suite`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ctune_ops.config import ValidateConfig
from ctune_ops.records import TEXT_FIELDS

# Whitespace only (or empty): Python's \s spelled out as the characters it matches (those where str.isspace()),
# written literally rather than as \s or \u escapes, and anchored with \A and \Z: pandas then runs it on RE2
# instead of falling back to Python's re row by row.
BLANK = "\\A[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*\\Z"
# Control characters that normalisation does not turn into spaces: C0 (but tab, newline and the other
# whitespace), DEL and C1 (but NEL). They break tokenizers and terminals and are never meant in text.
CONTROL_CHARS = r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]"
META_COLUMN = "meta"  # extra fields as JSON text ("" when none): screened for PHI like the text fields
PHI_SUFFIX = ":phi"  # "output:phi" is output with allowed spans (validate.phi_allow) blanked
TOKENS_COLUMN = "n_tokens"  # null where the count was not needed (see validation/tokens.py)
SUITE_NAME = "ctune_validate"
NULL_AWARE = {"ExpectColumnValuesToNotBeNull"}  # the expectations that look at null values at all
RESULT_FORMAT = {
    "result_format": "COMPLETE",  # every unexpected row's index, not a sample
    "partial_unexpected_count": 0,
    "exclude_unexpected_values": True,  # the indices are enough; values can be 10 MB rows
    "return_unexpected_index_query": False,
}


@dataclass(frozen=True)
class CheckSpec:
    """One expectation of the suite: ``reason`` is the quarantine reason code of the rows it rejects."""

    key: str
    reason: str
    expectation: str  # class name in great_expectations.expectations
    column: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def expectation_type(self) -> str:
        """GX's snake_case name, e.g. ``expect_column_values_to_not_be_null``."""
        return _snake_case(self.expectation)


@functools.cache
def _snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def phi_column(name: str) -> str:
    """The frame column the PHI expectation of field ``name`` reads."""
    return f"{name}{PHI_SUFFIX}"


def plan_checks(config: ValidateConfig, phi_regex: str, token_bounds: bool) -> list[CheckSpec]:
    """The suite in priority order: a row failing several checks is quarantined with the first one's reason."""
    specs = [CheckSpec(f"missing_field:{f}", "missing_field", "ExpectColumnValuesToNotBeNull", f)
             for f in config.required]
    # normalisation turns whitespace-only text into "", so a text field is blank when empty: a length check, far
    # cheaper than a regex pass over the column; other required fields (the id) keep the regex
    specs += [CheckSpec(f"blank_field:{f}", "blank_field", "ExpectColumnValueLengthsToBeBetween", f, {"min_value": 1})
              if f in TEXT_FIELDS else
              CheckSpec(f"blank_field:{f}", "blank_field", "ExpectColumnValuesToNotMatchRegex", f, {"regex": BLANK})
              for f in config.required]
    specs += [CheckSpec(f"control_chars:{f}", "control_chars", "ExpectColumnValuesToNotMatchRegex", f,
                        {"regex": CONTROL_CHARS}) for f in TEXT_FIELDS]
    specs += [CheckSpec(f"phi:{f}", "phi", "ExpectColumnValuesToNotMatchRegex", phi_column(f), {"regex": phi_regex})
              for f in (*TEXT_FIELDS, META_COLUMN)]
    for name in TEXT_FIELDS:
        bounds = getattr(config.chars, name)
        specs.append(CheckSpec(f"length_chars:{name}", "length_chars", "ExpectColumnValueLengthsToBeBetween", name,
                               {"min_value": bounds.min, "max_value": bounds.max}))
    if token_bounds:
        specs.append(CheckSpec("length_tokens", "length_tokens", "ExpectColumnValuesToBeBetween", TOKENS_COLUMN,
                               {"min_value": config.min_tokens, "max_value": config.max_tokens}))
    specs.append(CheckSpec("duplicate_id", "duplicate_id", "ExpectColumnValuesToBeUnique", "id"))
    return specs


@dataclass
class SuiteRun:
    """Which rows each check rejected (frame positions), and a summary fit for the report (no run times)."""

    unexpected: dict[str, list[int]]
    summary: dict[str, Any]


def _quiet() -> None:
    """Before GX is imported: its import logs hundreds of INFO lines, and analytics stay off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # 1.24.1 sends nothing; insurance if the pin moves
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def _context() -> Any:
    """An ephemeral context with in-memory stores and no docs site (nothing written, no temp folders)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _raised(outcome: Any) -> str | None:
    """GX's exception message for an expectation it could not evaluate, if any."""
    info = outcome.exception_info or {}
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


def _batches(frame: Any, specs: list[CheckSpec]) -> list[tuple[Any, list[CheckSpec]]]:
    """The frame cut into GX batches: column slices (no copy) with the expectations that read them.

    Every expectation but not-null skips nulls, and GX drops them by copying its batch once per expectation; so
    those run on slices of present values only (index kept), one per set of columns missing in the same rows.
    Not-null checks of columns that do have nulls share one unfiltered batch; the others join their column's
    batch. Screened copies (``output:phi``) get batches of their own: GX copies every column of a batch for the
    rows an expectation rejects, and a text and its copy are the two largest columns there are.
    """
    present = {column: frame[column].notna().to_numpy() for column in dict.fromkeys(s.column for s in specs)}
    with_nulls = [s for s in specs if s.expectation in NULL_AWARE and not present[s.column].all()]
    batches = [(frame[list(dict.fromkeys(s.column for s in with_nulls))], with_nulls)] if with_nulls else []
    groups: dict[tuple[bytes, bool], list[CheckSpec]] = {}
    for spec in specs:
        if spec not in with_nulls:
            mask = present[spec.column]
            key = (b"" if mask.all() else mask.tobytes(), spec.column.endswith(PHI_SUFFIX))
            groups.setdefault(key, []).append(spec)
    for (mask, _), group in groups.items():
        data = frame[list(dict.fromkeys(spec.column for spec in group))]
        if mask:
            data = data[present[group[0].column]]
        batches.append((data, group))
    return batches


def run_suite(frame: Any, specs: list[CheckSpec]) -> SuiteRun:
    """Validate the pandas ``frame`` (index = row position) with the planned expectations."""
    _quiet()
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.validator.v1_validator import Validator

    context = _context()
    batch_definition = (
        context.data_sources.add_pandas(name="incoming")
        .add_dataframe_asset(name="day")
        .add_batch_definition_whole_dataframe(name="column")
    )
    outcomes: dict[str, Any] = {}
    batches = _batches(frame, specs)
    for index, (data, batch_specs) in enumerate(batches):
        suite = gx.ExpectationSuite(name=f"{SUITE_NAME}:{index}")
        for spec in batch_specs:
            expectation_class = getattr(gxe, spec.expectation)
            suite.add_expectation(expectation_class(column=spec.column, meta={"ctune_check": spec.key}, **spec.kwargs))
        # the validator fetches the batch itself; Batch.validate would fetch (and fingerprint) it a second time
        validator = Validator(batch_definition=batch_definition, batch_parameters={"dataframe": data},
                              result_format=RESULT_FORMAT)
        result = validator.validate_expectation_suite(context.suites.add(suite))
        outcomes.update({r.expectation_config.meta["ctune_check"]: r for r in result.results})

    unexpected: dict[str, list[int]] = {}
    expectations = []
    for spec in specs:
        outcome = outcomes[spec.key]
        error = _raised(outcome)
        if error is not None:
            raise RuntimeError(
                f"Great Expectations could not evaluate {spec.expectation_type} on column {spec.column!r}: {error}"
            )
        details = outcome.result or {}
        unexpected[spec.key] = [int(i) for i in details.get("unexpected_index_list") or []]
        expectations.append({
            "check": spec.key,
            "reason": spec.reason,
            "expectation": spec.expectation_type,
            "column": spec.column,
            "kwargs": spec.kwargs,
            "success": bool(outcome.success),
            "element_count": int(details.get("element_count", len(frame))),  # rows present, but for not-null
            "missing_count": int(details.get("missing_count", 0)),
            "unexpected_count": int(details.get("unexpected_count", 0)),
        })
    failed = sum(1 for e in expectations if not e["success"])
    summary = {
        "great_expectations": gx.__version__,
        "suite": SUITE_NAME,
        "success": failed == 0,
        "statistics": {
            "evaluated_expectations": len(expectations),
            "successful_expectations": len(expectations) - failed,
            "unsuccessful_expectations": failed,
        },
        "rows": len(frame),
        "batches": len(batches),
        "expectations": expectations,
    }
    return SuiteRun(unexpected, summary)

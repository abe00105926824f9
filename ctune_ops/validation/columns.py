"""The day's columns made ready for the suite: normalised text, PHI masked on request, token counts, one frame.

Everything here works on whole columns (pyarrow, pandas); Python touches single rows only where they need it
(a string normalisation could change, a row with PHI to mask, a row whose token count the byte bounds cannot
certify).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ctune_ops.config import CtuneConfig
from ctune_ops.records import TEXT_FIELDS, normalize_column
from ctune_ops.validation.day import Day
from ctune_ops.validation.phi import PhiScreen
from ctune_ops.validation.suite import META_COLUMN, TOKENS_COLUMN, phi_column
from ctune_ops.validation.tokens import TokenCounter


@dataclass
class Columns:
    """The day's frame, the Python values it was built from, and what redaction and token counting did."""

    values: dict[str, list[Any]]
    frame: Any
    redactions: dict[int, dict[str, int]]
    tokens: dict[str, Any]


def str_series(values: list[Any] | Any) -> Any:
    """A pandas string Series (Arrow-backed; from a pyarrow array without copying)."""
    import pandas as pd

    return pd.Series(pd.array(values, dtype="str"))


def redact_rows(values: dict[str, list[Any]], phi: PhiScreen) -> dict[int, dict[str, int]]:
    """Mask PHI in the text fields of the rows where it occurs (in place); what was masked, per row."""
    rows = sorted({row for name in TEXT_FIELDS for row in phi.flag(str_series(values[name]))})
    done: dict[int, dict[str, int]] = {}
    for row in rows:
        counts: Counter[str] = Counter()
        for name in TEXT_FIELDS:
            text = values[name][row]
            if text:
                values[name][row], found = phi.redact(text)
                counts.update(found)
        if counts:
            done[row] = dict(sorted(counts.items()))
    return done


def token_counts(series: dict[str, Any], values: dict[str, list[Any]], config: CtuneConfig,
                  counter: TokenCounter) -> tuple[Any, dict[str, Any]]:
    """Token counts of the rendered training text where needed (NaN elsewhere), and how they were obtained.

    Rows already outside their character bounds, or missing instruction or output, need no count; rows whose
    byte length certifies the bounds (validation/tokens.py) need none either.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = len(values["id"])
    limits, prompt = config.validate, config.models.prompt
    within = np.ones(rows, dtype=bool)
    n_bytes = np.zeros(rows, dtype=np.int64)
    for name in TEXT_FIELDS:
        array = pa.array(series[name].array)  # the Series' own Arrow data, no copy
        bounds = getattr(limits.chars, name)
        length = pc.fill_null(pc.utf8_length(array), 0).to_numpy()
        within &= (length >= bounds.min) & (length <= bounds.max)
        n_bytes += pc.fill_null(pc.binary_length(array), 0).to_numpy()
    has_input = (series["input"].str.len().fillna(0) > 0).to_numpy()
    with_input = len(prompt.with_input.format(instruction="", input="").encode("utf-8"))
    without_input = len(prompt.without_input.format(instruction="").encode("utf-8"))
    n_bytes += np.where(has_input, with_input, without_input)
    renderable = (series["instruction"].notna() & series["output"].notna()).to_numpy()
    candidates = within & renderable
    certified = candidates & counter.certified(n_bytes, limits.min_tokens, limits.max_tokens)
    needed = np.flatnonzero(candidates & ~certified)
    texts = [prompt.render(values["instruction"][i], values["input"][i] or "") + values["output"][i] for i in needed]
    counts = np.full(rows, np.nan)
    counts[needed] = counter.count(texts)
    info = {
        "method": counter.method,
        "tokenizer": config.models.base,
        "longest_token_bytes": counter.longest_token_bytes,
        "counted": int(len(needed)),
        "certified_by_bytes": int(certified.sum()),
        "not_needed": int(rows - candidates.sum()),
    }
    return counts, info


def build_columns(day: Day, config: CtuneConfig, phi: PhiScreen, counter: TokenCounter | None) -> Columns:
    """The frame the suite validates (index = row position in the day) and the values the outputs are made of."""
    import pandas as pd

    limits = config.validate
    values: dict[str, list[Any]] = dict(day.columns)
    if "input" not in limits.required:
        values["input"] = [v if v is not None else "" for v in values["input"]]
    arrays = {}
    for name in TEXT_FIELDS:
        values[name], arrays[name] = normalize_column(values[name])
    values[META_COLUMN] = [json.dumps(m, ensure_ascii=False, sort_keys=True) if m else "" for m in day.metas]
    if limits.phi == "redact":
        redactions = redact_rows(values, phi)
        arrays = {}  # masked text: the Series are built from the lists again
    else:
        redactions = {}
    # The frame holds what the suite reads: the text fields, id, meta, and source/created_at only when required.
    framed = dict.fromkeys((*TEXT_FIELDS, "id", META_COLUMN, *limits.required))
    series = {name: str_series(arrays.get(name, values[name])) for name in framed}
    for name in (*TEXT_FIELDS, META_COLUMN):
        series[phi_column(name)] = phi.screen(series[name])
    tokens: dict[str, Any] = {"method": "off (validate.token_bounds: false)"}
    if counter is not None:
        counts, tokens = token_counts(series, values, config, counter)
        values[TOKENS_COLUMN] = counts.tolist()
        series[TOKENS_COLUMN] = pd.Series(counts)
    frame = pd.DataFrame(series, copy=False)
    frame.index = pd.RangeIndex(len(frame))
    return Columns(values, frame, redactions, tokens)

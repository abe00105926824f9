"""PHI screening: phone numbers, e-mail addresses, SSN- and medical-record-number-like ids.

The patterns (``validate.phi_patterns``) are Python regular expressions. Over the batch they run through pandas
string methods, exactly as Great Expectations runs them. pandas uses RE2 (pyarrow) where RE2 gives Python's
answer and falls back to Python's ``re`` row by row otherwise -- for ``\\b``, ``\\w`` or ``\\d`` that is as soon as
one string of the column holds one non-ASCII character, which made screening real text sixty times slower.

So the patterns read a *screened* copy of each text: every non-ASCII character folded to one ASCII character of
the same class for regular expressions (letters and digits to ``_``, spaces to `` ``, anything else to ``~``;
lengths do not change), then text matched by a ``phi_allow`` pattern (toll-free numbers of organisations) blanked
to one space. On ASCII text ``\\b`` and ``\\w`` mean the same in both engines, so the batch stays on RE2 and
screening, naming and redaction agree with the GX expectation row for row. Patterns should still avoid ``\\s``
and ``$``, on which pandas always leaves RE2.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ctune_ops.config import ValidateConfig

ALLOW_BLANK = " "  # what an allowed span becomes before screening
FOLD_WORD, FOLD_SPACE, FOLD_OTHER = "_", " ", "~"  # a non-ASCII character, by its class, before screening
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ENGINE_PROBES = ("probe", "two\nlines")  # ASCII text, with and without newlines: the RE2 paths pandas may take


class PatternError(ValueError):
    """A configured pattern that the batch engine cannot run."""


def _combine(patterns: dict[str, str]) -> str:
    return "|".join(f"(?:{p})" for p in patterns.values())


@functools.lru_cache(maxsize=4096)
def _fold_char(char: str) -> str:
    if char.isalnum():
        return FOLD_WORD
    return FOLD_SPACE if char.isspace() else FOLD_OTHER


def fold(text: str) -> str:
    """``text`` with each non-ASCII character replaced by an ASCII one that regular expressions class alike."""
    if text.isascii():
        return text
    return _NON_ASCII.sub(lambda match: _fold_char(match.group(0)), text)


@dataclass(frozen=True)
class PhiScreen:
    """Compiled PHI and allow patterns of one configuration."""

    sources: dict[str, str]
    patterns: dict[str, re.Pattern[str]]
    allow_source: str | None
    allow: re.Pattern[str] | None
    mask: str

    @classmethod
    def from_config(cls, config: ValidateConfig) -> PhiScreen:
        allow = _combine(config.phi_allow) if config.phi_allow else None
        return cls(
            sources=dict(config.phi_patterns),
            patterns={name: re.compile(p) for name, p in config.phi_patterns.items()},
            allow_source=allow,
            allow=re.compile(allow) if allow else None,
            mask=config.phi_mask,
        )

    @property
    def combined(self) -> str:
        """All PHI patterns as one expression: one pass over a column."""
        return _combine(self.sources)

    def check_engine(self) -> None:
        """Fail naming the config key if pandas' RE2 path rejects a pattern that Python's re accepts."""
        import pandas as pd

        probe = pd.Series(_ENGINE_PROBES, dtype="str")
        named = [(f"validate.phi_patterns.{n}", p) for n, p in self.sources.items()]
        if self.allow_source:
            named.append(("validate.phi_allow", self.allow_source))
        for key, pattern in named:
            try:
                probe.str.contains(pattern, regex=True)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types; any failure is fatal here
                raise PatternError(f"{key}: the pattern {pattern!r} cannot run on the batch engine: {exc}") from None

    # -- batch ------------------------------------------------------------------------------------------
    def screen(self, column: Any) -> Any:
        """The pandas string Series ``column`` folded to ASCII and with allowed spans blanked (see the module
        docstring): what the PHI expectations read. Only strings that need it are touched."""
        import pandas as pd

        ascii_only = (column.isna() | column.str.isascii()).to_numpy(dtype=bool)
        if not ascii_only.all():
            column = column.copy()
            rows = (~ascii_only).nonzero()[0]
            column.iloc[rows] = pd.array([fold(text) for text in column.iloc[rows]], dtype="str")
        if not self.allow_source or not column.str.contains(self.allow_source, regex=True).any():
            return column
        return column.str.replace(self.allow_source, ALLOW_BLANK, regex=True)

    def flag(self, column: Any) -> list[int]:
        """Positions in the pandas string Series ``column`` where a PHI pattern matches (after screening)."""
        hits = self.screen(column).str.contains(self.combined, regex=True).fillna(False).to_numpy(dtype=bool)
        return hits.nonzero()[0].tolist()

    # -- one row ----------------------------------------------------------------------------------------
    def _screened(self, text: str) -> str:
        folded = fold(text)
        return self.allow.sub(ALLOW_BLANK, folded) if self.allow else folded

    def names(self, text: str) -> list[str]:
        """The PHI patterns found in ``text`` (screened as the batch is), in configuration order."""
        screened = self._screened(text)
        return [name for name, pattern in self.patterns.items() if pattern.search(screened)]

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """``text`` with every PHI match replaced by the mask, leaving allowed spans alone; and counts per pattern.

        Matches are found in the folded text, whose positions are the original's, and masked in the original.
        """
        counts: Counter[str] = Counter()
        if not text:
            return text, counts
        folded = fold(text)
        pieces, start = [], 0
        spans = [m.span() for m in self.allow.finditer(folded)] if self.allow else []
        for begin, end in [*spans, (len(text), len(text))]:
            pieces.append(self._redact_piece(text[start:begin], folded[start:begin], counts))
            pieces.append(text[begin:end])
            start = end
        return "".join(pieces), counts

    def _redact_piece(self, piece: str, folded: str, counts: Counter[str]) -> str:
        for name, pattern in self.patterns.items():
            mask = self.mask.format(name=name)
            spans = [m.span() for m in pattern.finditer(folded)]
            if not spans:
                continue
            counts[name] += len(spans)
            for begin, end in reversed(spans):  # the mask is ASCII: folded and original stay aligned
                piece = piece[:begin] + mask + piece[end:]
                folded = folded[:begin] + mask + folded[end:]
        return piece

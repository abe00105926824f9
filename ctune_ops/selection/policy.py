"""The selection policy (DESIGN §3.4): from scores to one decision per unique row.

Rules apply in this order, the first that matches decides:

1. ``misaligned`` -- ``ifd >= ifd_max``: the instruction does not make the answer more predictable;
2. ``known``      -- ``ppl <= tau_known``: the proxy predicts the answer as well as it predicts rows already
   trained into production. ``tau_known`` is the ``known_quantile`` of the proxy's ppl on a sample of those rows,
   recomputed every day, so the threshold follows the proxy as it learns;
3. ``too_novel``  -- (off unless ``too_novel_quantile`` is set) ``ppl`` above that quantile of the batch;
4. ``budget``     -- more rows or tokens left than ``max_rows``/``max_tokens``: the highest-IFD rows are kept.

Everything else is ``selected``. ``select.strategy`` ``all`` selects every row and ``random`` keeps
``random_rows`` rows drawn at random (the rest are cut as ``budget``): the experiment's baselines, no thresholds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctune_ops.config import SelectConfig

MISALIGNED, KNOWN, TOO_NOVEL, BUDGET, SELECTED = "misaligned", "known", "too_novel", "budget", "selected"
POLICY_DECISIONS = (MISALIGNED, KNOWN, TOO_NOVEL, BUDGET, SELECTED)


@dataclass
class PolicyResult:
    decisions: list[str]
    tau_known: float | None
    too_novel_ppl: float | None
    notes: list[str] = field(default_factory=list)

    def thresholds(self) -> dict[str, Any]:
        return {"tau_known": self.tau_known, "too_novel_ppl": self.too_novel_ppl}


def calibrate_tau(calibration_ppl: np.ndarray, quantile: float) -> float | None:
    """The ``quantile`` of the proxy's ppl on trained rows; None when there are none to calibrate on."""
    finite = calibration_ppl[np.isfinite(calibration_ppl)]
    return float(np.quantile(finite, quantile)) if len(finite) else None


def decide(ppl: np.ndarray, ifd: np.ndarray, tokens: np.ndarray, calibration_ppl: np.ndarray,
           config: SelectConfig, draw: str = "") -> PolicyResult:
    """One decision per row (see the module docstring); ``draw`` seeds the random strategy (the batch date)."""
    n = len(ppl)
    decisions = np.full(n, SELECTED, dtype=object)
    notes = []
    if config.strategy == "all":
        return PolicyResult(decisions.tolist(), None, None, ["strategy all: every unique row selected"])
    if config.strategy == "random":
        keep = set(random.Random(f"{config.seed}:{draw}:random").sample(range(n), min(config.random_rows, n)))
        decisions[[k for k in range(n) if k not in keep]] = BUDGET
        return PolicyResult(decisions.tolist(), None, None,
                            [f"strategy random: {len(keep)} of {n} rows drawn at random, the rest cut as budget"])
    misaligned = ~(ifd < config.ifd_max)  # NaN (no scored token) counts as misaligned, never silently kept
    decisions[misaligned] = MISALIGNED
    tau = calibrate_tau(calibration_ppl, config.known_quantile)
    if tau is None:
        notes.append("no rows trained into production to calibrate on: the known rule was not applied")
    else:
        decisions[(decisions == SELECTED) & (ppl <= tau)] = KNOWN
    cut = None
    if config.too_novel_quantile is not None and n:
        cut = float(np.quantile(ppl, config.too_novel_quantile))
        decisions[(decisions == SELECTED) & (ppl > cut)] = TOO_NOVEL
    open_rows = np.flatnonzero(decisions == SELECTED)
    row_cap = config.max_rows if config.max_rows is not None else len(open_rows)
    token_cap = config.max_tokens if config.max_tokens is not None else int(tokens[open_rows].sum())
    if len(open_rows) > row_cap or int(tokens[open_rows].sum()) > token_cap:
        order = open_rows[np.lexsort((open_rows, -ifd[open_rows]))]  # highest ifd first, ties in batch order
        kept_tokens = np.cumsum(tokens[order])
        keep = (np.arange(len(order)) < row_cap) & (kept_tokens <= token_cap)
        decisions[order[~keep]] = BUDGET
        notes.append(f"budget: kept {int(keep.sum())} of {len(order)} rows (max_rows {config.max_rows}, "
                     f"max_tokens {config.max_tokens})")
    return PolicyResult(decisions.tolist(), tau, cut, notes)

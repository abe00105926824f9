"""Token lengths in the deployed model's tokenizer, counted only where a count can change a decision.

Tokenizing a whole day costs far more than validating it (a CPU BPE tokenizer runs at a few MB/s). For the
tokenizers real deployments use -- byte-level BPE without a normaliser (GPT-2, Llama 3, Qwen, the demo world's)
-- every token covers at least one byte of the text and at most the longest vocabulary entry, so

    ceil(bytes / longest_token_bytes)  <=  tokens  <=  bytes + 1   (+1: an optional prefix space)

and a row whose byte length keeps both bounds inside ``[min_tokens, max_tokens]`` is *certified* without
tokenizing it. Only the others are counted exactly. Any other tokenizer is counted exactly for every row.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX_SPACE_BYTES = 1  # ByteLevel(add_prefix_space=True) adds one space before the text


class TokenizerMissing(FileNotFoundError):
    """The deployed model's tokenizer cannot be loaded; the message says where it looked and what to do."""


@dataclass(frozen=True)
class TokenCounter:
    """A tokenizer with the byte bounds above (``byte_bounded`` False: count every row exactly)."""

    tokenizer: Any
    location: str
    byte_bounded: bool
    longest_token_bytes: int

    @property
    def method(self) -> str:
        return "byte-bound" if self.byte_bounded else "exact"

    def certified(self, n_bytes: Any, min_tokens: int, max_tokens: int) -> Any:
        """For a numpy array of UTF-8 byte lengths: True where the text is sure to have min..max tokens."""
        import numpy as np

        if not self.byte_bounded:
            return np.zeros(len(n_bytes), dtype=bool)
        upper = n_bytes + PREFIX_SPACE_BYTES
        lower = -(-n_bytes // self.longest_token_bytes)  # ceiling division
        return (lower >= min_tokens) & (upper <= max_tokens)

    def count(self, texts: list[str]) -> list[int]:
        """Exact token counts (no special tokens added: the training text is what gets bounded)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [len(encoding) for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _structure(tokenizer: Any) -> tuple[bool, int]:
    """(byte_bounded, longest token in bytes) from the fast tokenizer's own description."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False, 0
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    model = spec.get("model") or {}
    if not (byte_level and model.get("type") == "BPE" and spec.get("normalizer") is None):
        return False, 0
    # A byte-level vocabulary spells each byte as one character, so a token's length is its byte count.
    longest = max(len(token) for token in model.get("vocab", {"": 1}))
    added = [len(t.get("content", "").encode("utf-8")) for t in spec.get("added_tokens", [])]
    return True, max([longest, *added, 1])


@functools.lru_cache(maxsize=4)
def _load(location: str, version: int) -> TokenCounter:
    """Cached per location and modification time: a worker validating day after day loads it once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    byte_bounded, longest = _structure(tokenizer)
    return TokenCounter(tokenizer, location, byte_bounded, longest)


def load_token_counter(location: str, configured: str, local: bool) -> TokenCounter:
    """The tokenizer at ``location`` (``ws.model_path(models.base)``; ``local``: a workspace path, not a hub id).

    Fails naming the setting and the path when it is not there, rather than skipping the bound silently.
    """
    path = Path(location)
    if local and not path.exists():
        raise TokenizerMissing(
            f"validate.token_bounds needs the deployed model's tokenizer, but models.base ({configured!r}) "
            f"does not exist at {location}; bootstrap the models (`ctune world bootstrap`), point models.base "
            "at a model, or set validate.token_bounds: false"
        )
    try:
        return _load(location, path.stat().st_mtime_ns if path.exists() else 0)
    except (OSError, ValueError) as exc:
        raise TokenizerMissing(
            f"validate.token_bounds: cannot load a tokenizer from models.base ({configured!r} -> {location}): "
            f"{exc}; set validate.token_bounds: false to validate without token bounds"
        ) from None

"""MinHash signatures over word shingles, computed for a whole batch at once with numpy.

Why not datasketch: it hashes every shingle in Python (sha1 per shingle) and builds one object per row. Here the
Python work per row is one regex scan; words are hashed once per distinct word (cached), shingle hashes are
combined from word hashes with array arithmetic, and the ``num_perm`` permutations are one broadcast
multiply-add over all shingles of the batch followed by a segmented minimum.

Hash family: every shingle is first hashed to 32 well-mixed bits (splitmix64 over the words' blake2b hashes);
permutation ``i`` is then ``h_i(x) = (a_i * x + b_i) mod 2**32`` with random odd ``a_i``: a bijection of the 32-bit
values, so the minimum of ``h_i`` over a set is a uniformly chosen member's image and the share of equal signature
values estimates the Jaccard similarity (the inputs are already random-looking, which is what linear permutations
need). 32-bit arithmetic is the speed: numpy's SIMD loops take twice as many uint32 lanes as uint64, and the
block that the minimum reads is half the bytes. Signatures are uint32.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

WORD = re.compile(r"\w+")
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_COMBINE = np.uint64(0x9E3779B97F4A7C15)
_SHINGLES_PER_CHUNK = 1 << 15  # bounds the (shingles x num_perm) uint32 block to 16 MiB at 128 permutations
_PAIRS_PER_CHUNK = 4096  # signature pairs compared at once: two 2 MiB gathered blocks at 128 permutations
HASH_SCHEME = "splitmix64-blake2b/linear-mod-2^32"  # stored with the history: a change re-hashes it


def _splitmix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise: spreads every input bit over the whole word."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def shingle_text(instruction: str, input_text: str, output: str) -> str:
    """The text a record's shingles are taken from (the same three fields as its fingerprint)."""
    return f"{instruction} {input_text} {output}"


@dataclass
class MinHasher:
    """Signatures for texts: ``num_perm`` uint32 values each, from lower-cased word ``shingle_words``-grams.

    A text with fewer words than a shingle has one shingle, all its words (as the demo world's exact Jaccard
    does). The word-hash cache is what makes batches fast: a day's rows share most of their words.
    """

    num_perm: int = 128
    shingle_words: int = 3
    seed: int = 1
    _a: np.ndarray = field(init=False, repr=False)
    _b: np.ndarray = field(init=False, repr=False)
    _words: dict[str, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._a = rng.integers(0, 2**32 - 1, size=self.num_perm, dtype=np.uint32, endpoint=True) | np.uint32(1)
        self._b = rng.integers(0, 2**32 - 1, size=self.num_perm, dtype=np.uint32, endpoint=True)

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of every shingle of every text, and each text's shingle count (at least 1)."""
        words: list[str] = []
        counts = np.empty(len(texts), dtype=np.int64)
        for index, text in enumerate(texts):
            found = WORD.findall(text.lower())
            words += found
            counts[index] = len(found)
        table = self._words
        for word in dict.fromkeys(words).keys() - table.keys():  # each new distinct word hashed once
            table[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        hashes = np.array(list(map(table.__getitem__, words)), dtype=np.uint64)
        ends = np.cumsum(counts)
        starts = ends - counts
        k = self.shingle_words
        per_text = np.maximum(counts - k + 1, 1)
        first = np.repeat(starts, per_text)
        position = first + (np.arange(per_text.sum()) - np.repeat(np.cumsum(per_text) - per_text, per_text))
        limit = np.repeat(ends, per_text)
        combined = np.zeros(position.shape, dtype=np.uint64)
        padded = np.append(hashes, np.uint64(0))
        for offset in range(k):
            index = position + offset
            word = np.where(index < limit, padded[np.minimum(index, len(hashes))], np.uint64(0))
            combined = _splitmix(combined * _COMBINE + word)
        return (combined >> np.uint64(32)).astype(np.uint32), per_text

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), num_perm) uint32 array: row i is the MinHash signature of texts[i].

        The permutations run over chunks of whole texts on a thread per CPU (numpy releases the GIL in its
        array loops); each chunk is one in-place multiply-add over a (shingles, num_perm) block and one segmented
        minimum.
        """
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        if not texts:
            return out
        shingles, per_text = self.shingle_hashes(texts)
        bounds = np.concatenate(([0], np.cumsum(per_text)))
        chunks, text = [], 0
        while text < len(texts):  # chunks of whole texts, each about _SHINGLES_PER_CHUNK shingles
            stop = int(np.searchsorted(bounds, bounds[text] + _SHINGLES_PER_CHUNK, side="right")) - 1
            stop = min(max(stop, text + 1), len(texts))
            chunks.append((text, stop))
            text = stop

        def run(chunk: tuple[int, int]) -> None:
            first, stop = chunk
            block = shingles[bounds[first] : bounds[stop], None] * self._a
            block += self._b
            starts = bounds[first:stop] - bounds[first]
            out[first:stop] = np.minimum.reduceat(block, starts, axis=0)

        if len(chunks) == 1:
            run(chunks[0])
        else:
            with ThreadPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1)) as pool:
                list(pool.map(run, chunks))
        return out


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(rows, bands) int64 LSH keys: band ``j`` of a row hashes its ``num_perm / bands`` signature values.

    Signed 64-bit so they fit an SQLite INTEGER; two rows share a key (almost surely) only if the band is equal.
    """
    rows, num_perm = signatures.shape
    width = num_perm // bands
    grouped = signatures.reshape(rows, bands, width).astype(np.uint64)
    key = np.zeros((rows, bands), dtype=np.uint64) + np.arange(bands, dtype=np.uint64)
    for column in range(width):
        key = _splitmix(key * _COMBINE + grouped[:, :, column])
    return key.view(np.int64)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature values of ``a[k]`` and ``b[k]``, for (pairs, num_perm) arrays."""
    index = np.arange(len(a))
    return pair_jaccard(a, index, index, b)


def pair_jaccard(signatures: np.ndarray, first: np.ndarray, second: np.ndarray,
                 others: np.ndarray | None = None) -> np.ndarray:
    """Estimated Jaccard of ``signatures[first[k]]`` and ``others[second[k]]`` (``others`` defaults to
    ``signatures``), for every k.

    Gathers and compares a chunk of pairs at a time: the gathered blocks stay in cache, and counting equal values
    with ``count_nonzero`` avoids a float mean over a boolean array (together ~20x faster than doing both at once
    over the hundreds of thousands of candidate pairs that long, templated answers produce).
    """
    others = signatures if others is None else others
    equal = np.empty(len(first), dtype=np.int64)
    for start in range(0, len(first), _PAIRS_PER_CHUNK):
        stop = start + _PAIRS_PER_CHUNK
        equal[start:stop] = np.count_nonzero(
            signatures[first[start:stop]] == others[second[start:stop]], axis=1)
    return equal / signatures.shape[1]

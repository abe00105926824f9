"""MinHash signatures over word shingles, computed for a whole batch at once with numpy.

Why not datasketch: it hashes every shingle in Python (sha1 per shingle) and builds one object per row. Here the
only Python work per row is lower-casing and encoding it; everything else is array arithmetic over the batch:

* words: the batch's lower-cased UTF-8 bytes are classified by a 256-entry table (ASCII letters, digits and ``_``,
  and every byte of a non-ASCII character, after non-ASCII characters that ``\\w`` does not match became spaces),
  so the words are exactly the ``\\w+`` matches of the lower-cased text, found without a Python object per word;
* word hashes: a polynomial hash of each word's bytes modulo 2**64, read off one prefix sum over the buffer
  (``sum b_i P**i`` between the word's ends, shifted back by ``P**-start``: odd ``P`` is invertible mod 2**64);
* shingle hashes: ``shingle_words`` consecutive word hashes folded through the splitmix64 finaliser, taken down to
  32 well-mixed bits;
* permutations: ``h_i(x) = (a_i * x + b_i) mod 2**32`` with random odd ``a_i``, a bijection of the 32-bit values, so
  the minimum of ``h_i`` over a set is a uniformly chosen member's image and the share of equal signature values
  estimates the Jaccard similarity. They run as one broadcast multiply-add over a (num_perm, shingles) block per
  chunk of texts and a segmented minimum along the block's rows: that layout keeps the minimum a contiguous SIMD
  loop (the (shingles, num_perm) layout made numpy's ``reduceat`` walk columns with a stride, 20x slower), and a
  chunk's block stays in the core's cache. 32-bit lanes are twice as many per SIMD instruction as 64-bit ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_COMBINE = np.uint64(0x9E3779B97F4A7C15)
_WORD_BASE = 0x100000001B3  # P of the word hash: odd, so invertible modulo 2**64
_BYTES_PER_CHUNK = 1 << 20  # texts tokenised together: bounds the prefix-sum and power arrays to 8 MiB each
_SHINGLES_PER_CHUNK = 4096  # columns of one (num_perm, shingles) uint32 block: 2 MiB at 128 permutations
_PAIRS_PER_CHUNK = 4096  # signature pairs compared at once: two 2 MiB gathered blocks at 128 permutations
HASH_SCHEME = "poly64-utf8-words/splitmix64/linear-mod-2^32"  # stored with the history: a change re-hashes it

# non-ASCII characters that are not word characters (the ASCII ones are told apart by _WORD_BYTE)
_NON_ASCII_NON_WORD = re.compile(r"[^\w\x00-\x7f]")
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", dtype=np.uint8)] = True
_WORD_BYTE[0x80:] = True  # every byte of a multi-byte UTF-8 character left in the text belongs to a word


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


def _word_bytes(text: str) -> bytes:
    """A text lower-cased and UTF-8 encoded, its non-ASCII non-word characters replaced by spaces."""
    low = text.lower()
    return (low if low.isascii() else _NON_ASCII_NON_WORD.sub(" ", low)).encode("utf-8")


def _powers(base: int, count: int) -> np.ndarray:
    """``base**0 .. base**(count-1)`` modulo 2**64."""
    out = np.full(count, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, out=out)


@dataclass
class MinHasher:
    """Signatures for texts: ``num_perm`` uint32 values each, from lower-cased word ``shingle_words``-grams.

    A text with fewer words than a shingle has one shingle, all its words (as the demo world's exact Jaccard
    does).
    """

    num_perm: int = 128
    shingle_words: int = 3
    seed: int = 1
    _a: np.ndarray = field(init=False, repr=False)
    _b: np.ndarray = field(init=False, repr=False)
    _up: np.ndarray = field(init=False, repr=False)  # P**i mod 2**64 for the longest buffer seen so far
    _down: np.ndarray = field(init=False, repr=False)  # P**-i mod 2**64

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._a = rng.integers(0, 2**32 - 1, size=self.num_perm, dtype=np.uint32, endpoint=True) | np.uint32(1)
        self._b = rng.integers(0, 2**32 - 1, size=self.num_perm, dtype=np.uint32, endpoint=True)
        self._up = self._down = np.ones(1, dtype=np.uint64)

    def word_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The 64-bit hash of every word of every text, in order, and each text's word count."""
        encoded = [_word_bytes(text) for text in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ends = np.cumsum(lengths + 1)  # each text and the space after it
        hashes, counts = [], []
        first = 0
        while first < len(encoded):  # chunks of whole texts, each at most _BYTES_PER_CHUNK bytes (or one text)
            done = ends[first - 1] if first else 0
            stop = max(int(np.searchsorted(ends, done + _BYTES_PER_CHUNK, side="right")), first + 1)
            chunk_hashes, chunk_counts = self._chunk_word_hashes(encoded[first:stop], lengths[first:stop])
            hashes.append(chunk_hashes)
            counts.append(chunk_counts)
            first = stop
        if not hashes:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        return np.concatenate(hashes), np.concatenate(counts)

    def _chunk_word_hashes(self, encoded: list[bytes], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        buffer = np.frombuffer(b" ".join(encoded), dtype=np.uint8)  # the space keeps words inside their text
        n = len(buffer)
        if n >= len(self._up):  # computed as needed (a whole chunk's tables cost 30 ms), kept up to a chunk
            size = max(n + 1, min(2 * len(self._up), _BYTES_PER_CHUNK + 1))
            up, down = _powers(_WORD_BASE, size), _powers(pow(_WORD_BASE, -1, 2**64), size)
            if size <= _BYTES_PER_CHUNK + 1:
                self._up, self._down = up, down
        else:
            up, down = self._up, self._down
        edges = np.diff(_WORD_BYTE[buffer].view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(buffer * up[:n], out=prefix[1:])
        hashes = (prefix[ends] - prefix[starts]) * down[starts]
        text_starts = np.cumsum(lengths + 1) - lengths - 1
        counts = np.diff(np.searchsorted(starts, text_starts), append=len(starts))
        return hashes, counts

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of every shingle of every text, and each text's shingle count (at least 1).

        A shingle starts at every word that has ``shingle_words - 1`` more words in its text; a text with fewer
        words has one shingle, its words followed by zeros (an empty text: all zeros).
        """
        hashes, counts = self.word_hashes(texts)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # a zero word stands in for an empty text: its shingle is then all zeros, as it should be
            hashes = np.insert(hashes, (np.cumsum(counts) - counts)[empty], np.uint64(0))
            counts = np.maximum(counts, 1)
        k = self.shingle_words
        ends = np.cumsum(counts)
        remaining = np.repeat(ends, counts) - np.arange(len(hashes))  # words from this one to its text's end
        padded = np.append(hashes, np.zeros(k, dtype=np.uint64))
        combined = np.zeros(len(hashes), dtype=np.uint64)
        for offset in range(k):
            word = np.where(remaining > offset, padded[offset : offset + len(hashes)], np.uint64(0))
            combined = _splitmix(combined * _COMBINE + word)
        first_word = np.zeros(len(hashes), dtype=bool)
        first_word[ends - counts] = True
        keep = (remaining >= k) | (first_word & (np.repeat(counts, counts) < k))
        return (combined[keep] >> np.uint64(32)).astype(np.uint32), np.maximum(counts - k + 1, 1)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), num_perm) uint32 array: row i is the MinHash signature of texts[i].

        Each chunk of whole texts (about _SHINGLES_PER_CHUNK shingles) is one multiply-add into a reused
        (num_perm, shingles) block and one segmented minimum along its rows. Chunk size, measured on MedQuAD
        (1.2M shingles, 2 cores): 2,048 columns 177 ms, 3,000-16,384 columns 52-56 ms, 32,768 columns (16 MiB,
        out of cache) 111 ms.
        """
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        if not texts:
            return out
        shingles, per_text = self.shingle_hashes(texts)
        bounds = np.concatenate(([0], np.cumsum(per_text)))
        block = np.empty((self.num_perm, max(_SHINGLES_PER_CHUNK, int(per_text.max()))), dtype=np.uint32)
        a, b = self._a[:, None], self._b[:, None]
        first = 0
        while first < len(texts):
            stop = int(np.searchsorted(bounds, bounds[first] + _SHINGLES_PER_CHUNK, side="right")) - 1
            stop = min(max(stop, first + 1), len(texts))
            lo, hi = bounds[first], bounds[stop]
            view = block[:, : hi - lo]
            np.multiply(a, shingles[None, lo:hi], out=view)
            view += b
            out[first:stop] = np.minimum.reduceat(view, bounds[first:stop] - lo, axis=1).T
            first = stop
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

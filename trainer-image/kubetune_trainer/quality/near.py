"""Near copies between the splits: evaluation records are indexed, train records are queried one by one.

Text: MinHash LSH (datasketch) over word shingles, every candidate verified by the exact Jaccard similarity of the
two shingle sets (kept for the small evaluation side), so LSH's false candidates never count.

Shingles are word 3-grams (SHINGLE). Smaller n matches texts that share words in another order; larger n misses edited
copies of short texts. With 3-grams one changed word keeps a text at Jaccard >= 0.8 from 30 words on, two changed
words from 50 words on; shorter edited copies fall under the threshold (identical ones are the exact check's job).
A text shorter than 3 words is one shingle; an empty text has none and is never near anything.

Images: the sha256 of the file's bytes for exact copies, a 64-bit perceptual hash (imagehash.phash) for near ones.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Hashable

import imagehash
import numpy as np
from datasketch import MinHash, MinHashLSH
from PIL import Image

SHINGLE = 3
# Odd 64-bit constants: the polynomial that combines word hashes into a shingle, and the final mix to 32 bits.
_POLY = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xC2B2AE3D27D4EB4F)
# Shingles hashed into a MinHash per batch: datasketch builds a (batch x num_perm) matrix.
_BATCH = 8192
# How far from the threshold a candidate's MinHash estimate must be to decide without the exact Jaccard: about
# four standard errors of a 128-value estimate near 0.8 (sqrt(0.8 x 0.2 / 128) = 0.035).
ESTIMATE_MARGIN = 0.07


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values: a sort and a comparison (numpy 2's np.unique hashes, and is 4-20x slower here).
    Sorts `values` in place."""
    values.sort()
    keep = np.empty(values.size, dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def shingles(text: str, n: int = SHINGLE) -> np.ndarray:
    """The sorted, distinct 32-bit hashes of a text's word n-grams (one for the whole text if it has fewer words)."""
    # Each word hashed once (crc32: stdlib, deterministic in every process), n-grams combined by a polynomial.
    words = np.fromiter(map(zlib.crc32, text.encode().split()), dtype=np.uint64)
    if not words.size:
        return np.empty(0, dtype=np.uint32)
    k = min(n, words.size)
    count = words.size - k + 1
    combined = np.zeros(count, dtype=np.uint64)
    for i in range(k):
        combined = combined * _POLY + words[i:i + count]
    return _distinct(((combined * _MIX) >> np.uint64(32)).astype(np.uint32))


class NearIndex:
    """MinHash LSH over the evaluation splits' records (small): train records are queried against it one by one.

    A query costs a word split and hash, then a prefilter: a text can reach Jaccard >= threshold with some indexed
    text only if that share of its shingles occurs somewhere in the index, checked in a bitmap of the index's
    shingles. Most train records stop there; the rest get a MinHash, an LSH lookup tuned for recall (a pair at the
    threshold is a candidate with probability > 0.99), and each candidate is decided by its MinHash estimate or,
    near the threshold, by the exact Jaccard.
    Built in one process and read by forked workers: plain dicts and numpy arrays, no thread, no lock, no file.
    The first query after the last add builds the arrays and the bitmap once: query once (even `query("")`)
    before forking, so the workers share them instead of each building its own.
    Keys must be distinct: a key added twice is a ValueError.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = SHINGLE):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.shingle = shingle
        # Shingles are hashed already: the MinHash takes them as they are.
        self._empty = MinHash(num_perm=num_perm, hashfunc=int)
        self._lsh = MinHashLSH(threshold=max(threshold - 0.05, 0.05), num_perm=num_perm, weights=(0.3, 0.7))
        self._keys: list[Hashable] = []  # insertion order; LSH holds row numbers
        self._known: set[Hashable] = set()
        # Per row, once frozen: its MinHash values, and its shingle set as a slice of one flat array.
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._signatures = np.empty((0, num_perm), dtype=np.uint64)
        self._flat = np.empty(0, dtype=np.uint32)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._present = np.zeros(1, dtype=np.uint64)  # a bit per shingle hash's low bits: in the index or not

    def __len__(self) -> int:
        return len(self._known)

    def _minhash(self, shingle_set: np.ndarray) -> MinHash:
        m = self._empty.copy()
        for start in range(0, shingle_set.size, _BATCH):
            m.update_batch(shingle_set[start:start + _BATCH].tolist())
        return m

    def add(self, key: Hashable, text: str) -> None:
        if key in self._known:
            raise ValueError(f"key {key!r} added twice")
        self._known.add(key)
        shingle_set = shingles(text, self.shingle)
        if shingle_set.size:  # an empty text is counted, never near anything
            minhash = self._minhash(shingle_set)
            self._lsh.insert(len(self._keys), minhash)
            self._keys.append(key)
            self._pending.append((minhash.hashvalues, shingle_set))

    def _freeze(self) -> None:
        # The rows added since the last query join the arrays (once after the last add, in practice).
        if not self._pending:
            return
        signatures, sets = zip(*self._pending, strict=True)
        self._pending = []
        self._signatures = np.concatenate([self._signatures, np.stack(signatures)])
        self._flat = np.concatenate([self._flat, *sets])
        self._offsets = np.concatenate([self._offsets, self._offsets[-1] + np.cumsum([s.size for s in sets])])
        # The bitmap has about 64 bits per shingle (a power of two): a shingle not in the index finds its bit set
        # in about 1.5% of cases, which only lets a few more records past the prefilter.
        bits = 1 << max(int(self._flat.size * 64).bit_length(), 6)
        self._present = np.zeros(bits // 64, dtype=np.uint64)
        np.bitwise_or.at(self._present, self._flat >> np.uint32(6) & np.uint32(bits // 64 - 1),
                         np.uint64(1) << (self._flat & np.uint32(63)).astype(np.uint64))

    def _in_index(self, shingle_set: np.ndarray) -> np.ndarray:
        """Whether each shingle is (probably: see _freeze) one of the index's."""
        words = self._present[shingle_set >> np.uint32(6) & np.uint32(self._present.size - 1)]
        return (words >> (shingle_set & np.uint32(63)).astype(np.uint64) & np.uint64(1)).astype(bool)

    def query(self, text: str) -> list:
        """Keys of added texts whose Jaccard similarity of word shingles with `text` is >= threshold."""
        self._freeze()
        if not self._flat.size:
            return []
        shingle_set = shingles(text, self.shingle)
        if not shingle_set.size:
            return []
        # Prefilter: J(A, B) >= t needs at least t * |A| of A's shingles in B, hence in the index.
        if np.count_nonzero(self._in_index(shingle_set)) < self.threshold * shingle_set.size - 1e-9:
            return []
        minhash = self._minhash(shingle_set)
        rows = np.fromiter(self._lsh.query(minhash), dtype=np.int64)
        if not rows.size:
            return []
        # The candidates' estimated Jaccard (the share of equal MinHash values) decides those far from the
        # threshold at once; the exact Jaccard decides the rest, all in one pass over their shingles. Templated
        # data makes hundreds of candidates per record.
        estimates = (self._signatures[rows] == minhash.hashvalues).mean(axis=1)
        sure = estimates >= self.threshold + ESTIMATE_MARGIN
        unsure = rows[~sure & (estimates >= self.threshold - ESTIMATE_MARGIN)]
        near = np.concatenate([rows[sure], unsure[self._jaccards(unsure, shingle_set) >= self.threshold - 1e-9]])
        return [self._keys[row] for row in np.sort(near)]

    def _jaccards(self, rows: np.ndarray, shingle_set: np.ndarray) -> np.ndarray:
        """The exact Jaccard similarity of each row's shingle set with `shingle_set` (sorted, distinct)."""
        if not rows.size:
            return np.empty(0)
        starts, ends = self._offsets[rows], self._offsets[rows + 1]
        sizes = ends - starts
        # Every row's shingles in one array (row i's at [first[i], first[i] + sizes[i])), each looked up once.
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        gathered = self._flat[np.repeat(starts - first, sizes) + np.arange(sizes.sum())]
        inter = np.add.reduceat(_members(gathered, shingle_set), first)
        return inter / (sizes + shingle_set.size - inter)


def _members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of `values` are in `sorted_set` (sorted, not empty): one binary search each."""
    return sorted_set[np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)] == values


def perceptual_hash(data: bytes) -> int | None:
    """The 64-bit phash of an image file's bytes, or None when they do not decode as an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(str(imagehash.phash(image)), 16)
    except Exception:  # Pillow's decoders raise many kinds (OSError, SyntaxError, ValueError, ...)
        return None


class ImageIndex:
    """Exact (sha256 of the bytes) and near (phash within max_distance bits) copies of the evaluation images.

    max_distance 6 of 64 bits: resizing, re-encoding as JPEG or a few percent of brightness or contrast move a phash
    by 0-4 bits, while different photos are typically 20-40 bits apart (imagehash's docs suggest <= 10 for "similar").
    The scan is linear, vectorized over the evaluation side (an xor and a popcount per indexed image).
    An image that does not decode is only checked for exact copies.
    """

    def __init__(self, max_distance: int = 6):
        self.max_distance = max_distance
        self._exact: dict[bytes, list] = {}
        self._keys: list = []
        self._digests: list[bytes] = []
        self._hashes: list[int] = []
        self._array = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._exact.values())

    def add(self, key: Hashable, data: bytes) -> None:
        digest = hashlib.sha256(data).digest()
        self._exact.setdefault(digest, []).append(key)
        phash = perceptual_hash(data)
        if phash is not None:
            self._keys.append(key)
            self._digests.append(digest)
            self._hashes.append(phash)

    def query(self, data: bytes) -> tuple[list, list]:
        """(keys with identical bytes, keys whose phash is within max_distance but whose bytes differ)."""
        digest = hashlib.sha256(data).digest()
        exact = list(self._exact.get(digest, ()))
        phash = perceptual_hash(data) if self._hashes else None
        if phash is None:
            return exact, []
        if self._array.size != len(self._hashes):
            self._array = np.array(self._hashes, dtype=np.uint64)
        distances = np.bitwise_count(self._array ^ np.uint64(phash))
        near = [self._keys[i] for i in np.flatnonzero(distances <= self.max_distance)
                if self._digests[i] != digest]
        return exact, near

"""The freestanding guest's test stream and checksum, on the host side (guest/freestanding/teststream.h).

stream: xorshift64 (Marsaglia 2003, shifts 13/7/17) from a fixed seed; each
step's state is 8 little-endian bytes.  Generating 64 MiB one step at a time
in Python would take seconds, so :func:`stream` makes the first block of
states step by step and every later block from the one before with a single
GF(2) matrix, M^B (xorshift is linear over GF(2)), applied to a whole numpy
array at once.
"""

from __future__ import annotations

import numpy as np

SEED = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
BLOCK = 1 << 16                        # states per block


def step(x: int) -> int:
    x ^= (x << 13) & MASK
    x ^= x >> 7
    x ^= (x << 17) & MASK
    return x


def _apply(cols: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The GF(2) matrix whose column j is ``cols[j]``, applied to each word of ``xs``."""
    out = np.zeros_like(xs)
    one = np.uint64(1)
    for j in range(64):
        out ^= ((xs >> np.uint64(j)) & one) * cols[j]
    return out


def _power(cols: np.ndarray, n: int) -> np.ndarray:
    result = np.array([1 << j for j in range(64)], dtype=np.uint64)      # identity
    base = cols
    while n:
        if n & 1:
            result = _apply(base, result)
        base = _apply(base, base)
        n >>= 1
    return result


def stream(n: int) -> bytes:
    """The first ``n`` bytes of the guest's test stream."""
    words = (n + 7) // 8
    first, x = [], SEED
    for _ in range(min(BLOCK, words)):
        x = step(x)
        first.append(x)
    blocks = [np.array(first, dtype=np.uint64)]
    if words > BLOCK:
        jump = _power(np.array([step(1 << j) for j in range(64)], dtype=np.uint64), BLOCK)
        while len(blocks) * BLOCK < words:
            blocks.append(_apply(jump, blocks[-1]))
    return np.concatenate(blocks)[:words].astype("<u8").tobytes()[:n]


def fnv1a64(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    """64-bit FNV-1a (slow in Python: for small buffers only)."""
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def whash(data: bytes) -> int:
    """The guest's word hash (verify=word; teststream.h): h = FNV offset, then per
    little-endian 64-bit word w (the last zero-padded) h = (h + w) * FNV prime."""
    h = 0xCBF29CE484222325
    words = np.frombuffer(bytes(data) + bytes(-len(data) % 8), dtype="<u8")
    for w in words.tolist():
        h = ((h + w) * 0x100000001B3) & MASK
    return h

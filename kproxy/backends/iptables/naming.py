"""Chain names, computed exactly as kube-proxy computes them.

Matching names is what lets a node move between kube-proxy and kproxy without a
single per-service chain being rewritten.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from typing import Any


def _fastest_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 beats OpenSSL's on 40-byte inputs (less set-up per call)."""
    for module in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(module).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _fastest_sha256()
_from_bytes = int.from_bytes
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def hash16(text: str) -> str:
    """kube-proxy's hash (base32 of SHA-256, first 16 characters), several times faster than
    base64.b32encode: 16 base32 characters are exactly the first 10
    digest bytes, encoded here 10 bits (two characters) at a time. Equality with naming is tested."""
    n = _from_bytes(_sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return "".join(
        [
            p[n >> 70],
            p[(n >> 60) & 1023],
            p[(n >> 50) & 1023],
            p[(n >> 40) & 1023],
            p[(n >> 30) & 1023],
            p[(n >> 20) & 1023],
            p[(n >> 10) & 1023],
            p[n & 1023],
        ]
    )


# sep_chains() encodes a batch of names in one big integer: lane i (25 bytes, counted from
# the least significant end) holds "KUBE-SEP-", 6 zero bytes and the first 10 digest bytes of
# name i. Four mask-and-shift rounds spread those 80 bits so each byte holds 5 of them; one
# translate then maps 0..31 to the base32 alphabet (the prefix's ASCII bytes map to themselves).
_SEP_PREFIX = b"KUBE-SEP-"
_LANE = 25
_BATCH = 64
_B32_TABLE = bytes.maketrans(bytes(range(32)), _B32.encode())


def _spread_masks() -> tuple[tuple[int, int, int], ...]:
    def repeat(pattern: int) -> int:
        return sum(pattern << (i * _LANE * 8) for i in range(_BATCH))

    keep_prefix = _from_bytes(_SEP_PREFIX, "big") << 128
    steps = []
    for width, group in ((128, 40), (64, 20), (32, 10), (16, 5)):
        high = low = 0
        for offset in range(0, 128, width):
            high |= ((1 << group) - 1) << (offset + group)
            low |= ((1 << group) - 1) << offset
        steps.append((repeat(high), width // 2 - group, repeat(low | keep_prefix)))
    return tuple(steps)


_SPREAD = _spread_masks()
_LANE_HEAD = _SEP_PREFIX + bytes(_LANE - 10 - len(_SEP_PREFIX))


def sep_chains(prefix: str, hostports: Sequence[str]) -> list[str]:
    """`"KUBE-SEP-" + hash16(prefix + hp)` for each host:port, in order.

    A cold render names one SEP chain per endpoint, the dearest step of it: here the port's
    prefix is hashed once (the digest state is copied per endpoint) and the base32 encoding
    of a batch of names is a handful of big-integer operations instead of a dozen per name."""
    base = _sha256(prefix.encode())
    out: list[str] = []
    for start in range(0, len(hostports), _BATCH):
        digests: list[bytes] = []
        append = digests.append
        for hp in hostports[start : start + _BATCH]:
            h = base.copy()
            h.update(hp.encode())
            append(h.digest()[:10])
        n = len(digests)
        y = _from_bytes(_LANE_HEAD + _LANE_HEAD.join(digests), "big")
        for high, shift, low in _SPREAD:
            y = ((y & high) << shift) | (y & low)
        text = y.to_bytes(n * _LANE, "big").translate(_B32_TABLE).decode()
        out.extend([text[i : i + _LANE] for i in range(0, n * _LANE, _LANE)])
    return out

"""Queue ids: unique across nodes and restarts, sortable by time, safe as file names.

An id is 21 characters of Crockford base32: 11 for the time in microseconds
(55 bits: good for over a thousand years), 10 for 50 random bits.  Sorting ids sorts by
arrival; two nodes sharing a spool name space cannot realistically collide.
"""
from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


def new_queue_id(now: float | None = None) -> str:
    micros = int((time.time() if now is None else now) * 1_000_000)
    rand = int.from_bytes(os.urandom(7), "big") >> 6
    return _b32(micros, 11) + _b32(rand, 10)

"""Byte counts for people."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    k = 0
    while abs(n) >= 1024 and k < len(_UNITS) - 1:
        n /= 1024
        k += 1
    return f"{n:.0f} B" if k == 0 else f"{n:.2f} {_UNITS[k]}"

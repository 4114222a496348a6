"""Where a process's memory comes from, for tests that check a tensor was not copied."""

from __future__ import annotations


def mapping_of(address: int) -> str:
    """The /proc/self/maps line of the memory that holds ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line.strip()
    return ""

"""Tiny helpers several layers share. Nothing here imports torch, so the report CLI stays light."""

from __future__ import annotations


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive ints, exactly (no float): e.g. the batches that cover a items."""
    return -(-a // b)


def safe_name(name: object) -> str:
    """`name` as a file-name part: letters, digits, '-' and '_' kept, anything else '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))

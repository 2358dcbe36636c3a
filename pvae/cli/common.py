"""What the ``pvae`` commands share: the table printer."""

from __future__ import annotations

__all__ = ["table"]


def table(rows) -> str:
    """``[(label, value), ...]`` as aligned, indented lines."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

"""What the ``pvae`` commands share: argument types that check values where they are parsed,
and the table printer."""

from __future__ import annotations

import argparse

from pvae.validation import check_count, check_float

__all__ = ["count", "likelihood_scale", "number", "table"]


def count(minimum: int = 1):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}, got {text!r}") from None
        try:
            return check_count("value", value, minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None
    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(minimum: float | None = None, strict: bool = False):
    """An argparse type: a finite number >= ``minimum`` (> with ``strict``)."""
    def parse(text: str) -> float:
        try:
            return check_float("value", float(text), minimum=minimum, strict=strict)
        except ValueError:
            bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(
                f"must be a finite number{bound}, got {text!r}") from None
    parse.__name__ = "number"
    return parse


def likelihood_scale(text: str):
    """An argparse type: ``learned``, ``decoder`` or a positive number."""
    if text in ("learned", "decoder"):
        return text
    return number(0.0, strict=True)(text)


def table(rows) -> str:
    """``[(label, value), ...]`` as aligned, indented lines."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

"""One validation layer for public arguments: every check names the parameter, shows the
value and says what is expected, so that each bad value gets one clear message.

Sizes are ``int`` (numpy integers too, never ``bool``); floats must be finite; each helper
returns the value converted to the plain Python type.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["MAX_SIZE", "check_choice", "check_count", "check_float", "check_numel",
           "check_probability", "check_sizes"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: The largest size a torch tensor can have in any dimension (and in all together): its sizes
#: are 64-bit signed integers.
MAX_SIZE = 2**63 - 1


def check_count(name: str, value, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """``value`` as an ``int`` >= ``minimum`` (1: a size; 0: a count that may be zero) and
    <= ``maximum`` (by default :data:`MAX_SIZE`, beyond what a tensor can hold).

    :raises TypeError: not an integer (``bool`` and floats such as ``2.7`` included).
    :raises ValueError: below ``minimum`` or above ``maximum``, the limit named.
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} "
                        f"({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value > maximum:
        limit = ("2**63 - 1, the largest size a torch tensor can have" if maximum == MAX_SIZE
                 else str(maximum))
        raise ValueError(f"{name} must be at most {limit}, got {value!r}")
    return int(value)


def check_numel(name: str, *sizes: int, itemsize: int = 8) -> int:
    """The number of entries of a tensor of shape ``sizes`` (e.g. a layer's weight), refused
    when its storage (``itemsize`` bytes per entry: float64 by default, so that the model can
    be moved to float64) would pass :data:`MAX_SIZE` bytes.

    :raises ValueError: naming ``name``, the shape and the limit.
    """
    numel = 1
    for size in sizes:
        numel *= int(size)
    if numel * itemsize > MAX_SIZE:
        raise ValueError(f"{name}: a tensor of shape {tuple(int(s) for s in sizes)} has {numel} "
                         f"entries, more than a torch tensor can hold (2**63 - 1 bytes); choose "
                         "smaller sizes")
    return numel


def check_sizes(name: str, value, minimum: int = 1) -> tuple[int, ...]:
    """A sequence of sizes (e.g. ``hidden_dims``) as a tuple of ``int`` >= ``minimum``; a string
    is refused (``"400"`` is not ``(400,)``).

    :raises TypeError: not a sequence of integers.
    :raises ValueError: an entry below ``minimum``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of integers >= {minimum} (e.g. (400,) or "
                        f"[512, 256]), got {value!r}")
    return tuple(check_count(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))


def check_float(name: str, value, *, minimum: float | None = None,
                maximum: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite ``float`` within ``[minimum, maximum]`` (open at ``minimum`` when
    ``strict``).

    :raises TypeError: not a real number.
    :raises ValueError: NaN, infinite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    low = "" if minimum is None else (f" > {minimum:g}" if strict else f" >= {minimum:g}")
    high = "" if maximum is None else f" <= {maximum:g}"
    expected = f"a finite number{low}{' and' if low and high else ''}{high}"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_probability(name: str, value) -> float:
    """A probability in [0, 1]."""
    return check_float(name, value, minimum=0.0, maximum=1.0)


def check_choice(name: str, value, choices) -> object:
    """``value`` if it is one of ``choices``.

    :raises ValueError: naming the choices.
    """
    if value not in tuple(choices):
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value

"""Kubernetes resource quantities ("500m" CPUs, "1Gi" of memory), parsed with messages naming the fix."""

from __future__ import annotations

import math
import re
from decimal import ROUND_CEILING, Decimal

__all__ = ["parse_cpu", "parse_memory", "parse_pids"]



_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d{1,3})|([a-zA-Z]*))")
# Decimal suffixes are powers of 1000 (n = 1000**-3 ... E = 1000**6), binary ones of 1024.
_SUFFIXES = {s: Decimal(1000) ** i for i, s in enumerate(["n", "u", "m", "", *"kMGTPE"], -3)}
_SUFFIXES |= {s + "i": Decimal(1024) ** i for i, s in enumerate("KMGTPE", 1)}


def _quantity(field: str, value: object, example: str) -> Decimal:
    """Parse a non-negative Kubernetes quantity (number, or string with suffix or exponent)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{field} must be a number or a quantity string, got "
                        f"{type(value).__name__} {value!r}; use e.g. {field}={example!r}")
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value.strip())
        if match is None or match[3] not in (None, *_SUFFIXES):
            raise ValueError(f"{field}={value!r} is not a Kubernetes quantity (suffixes: "
                             f"{', '.join(s for s in _SUFFIXES if s)}, or an exponent like 1e9); "
                             f"use e.g. {field}={example!r}")
        number, exponent, suffix = match.groups()
        amount = Decimal(number) * (Decimal(10) ** int(exponent[1:]) if exponent
                                    else _SUFFIXES[suffix])
    elif not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}; use e.g. {field}={example!r}")
    else:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if amount < 0:
        raise ValueError(f"{field} must not be negative, got {value!r}; "
                         f"use e.g. {field}={example!r}")
    return amount


def parse_cpu(value: int | float | str, *, field: str = "cpu") -> float:
    """Return a cpu quantity in cores: ``2``, ``1.5``, ``"2"``, ``"500m"`` (0.5 cores).

    Raises ValueError for a malformed or negative quantity, TypeError for a non-quantity type.
    """
    return float(_quantity(field, value, "500m"))


def parse_memory(value: int | float | str, *, field: str = "memory") -> int:
    """Return a memory quantity in bytes, rounded up: ``"512Mi"``, ``"1Gi"``, ``"1G"``, ``"1e9"``.

    Binary suffixes (Ki, Mi, Gi, ...) are powers of 1024, decimal ones (k, M, G, ...) of 1000.
    The suffixes n, u and m are rejected: ``"512m"`` is half a byte, surely a typo for
    ``"512Mi"``. Raises ValueError or TypeError as ``parse_cpu`` does.
    """
    amount = _quantity(field, value, "512Mi")
    if isinstance(value, str) and value.strip()[-1:] in ("n", "u", "m"):
        raise ValueError(f"{field}={value!r} is a fraction of a byte (suffix "
                         f"{value.strip()[-1]!r} is 10^-3 or less); use "
                         f"{field}={value.strip()[:-1] + 'Mi'!r} for mebibytes")
    return int(amount.to_integral_value(rounding=ROUND_CEILING))


def parse_pids(value: int | str, *, field: str = "pids") -> int:
    """Return a process count: a positive int, or a string of digits."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a whole number of processes >= 1, got {value!r}; "
                         f"use e.g. {field}=256")
    return value



"""Parsing and formatting sizes and durations for humans."""

from __future__ import annotations

import re

from torpor.errors import InvalidArgument

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, default_unit: str = "") -> int:
    """'512M', '2G', '1.5GiB', '4096' → bytes. Binary units throughout (M = MiB)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise InvalidArgument(f"not a size: {text!r} (examples: 512M, 2G, 1.5GiB)")
    number, unit = match.groups()
    unit = (unit or default_unit).lower()
    if unit not in _SIZE_UNITS:
        raise InvalidArgument(f"unknown size unit {unit!r} in {text!r} (use K, M, G or T)")
    return int(float(number) * _SIZE_UNITS[unit])


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'30s', '5m', '250ms', '10' (seconds) → seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise InvalidArgument(f"not a duration: {text!r} (examples: 30s, 5m, 250ms)")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit or "s"]


def parse_idle(text: str | float) -> float:
    """An auto-standby duration: a duration, or 0 / off (never) → seconds."""
    if isinstance(text, float | int):
        value = float(text)
    elif text.strip().lower() in ("off", "never", "none"):
        return 0.0
    else:
        value = parse_duration(text.strip())
    if value < 0:
        raise InvalidArgument(f"an idle time cannot be negative: {text!r}")
    return value


def format_size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"

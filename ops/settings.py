"""Reading the LORASERVE_* environment settings the kernels and graphs take: one parser for
integers and one for 0/1 switches, each error naming the setting."""

from __future__ import annotations

import os


def env_int(name: str, default: int, least: int | None = None, most: int | None = None) -> int:
    """The integer `name` is set to (unset or blank: `default`); not an integer, under `least`
    or over `most`, is an error naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not an integer") from None
    if least is not None and value < least:
        raise ValueError(f"{name}: {value} ({least} or more)")
    if most is not None and value > most:
        raise ValueError(f"{name}: {value} ({most} at most)")
    return value


def reject_removed(removed: dict[str, str]) -> None:
    """A setting that no longer exists but is set is an error naming it and what replaced it
    (`removed`: name -> why), not a knob that silently does nothing."""
    for name, why in removed.items():
        if os.environ.get(name, "").strip():
            raise ValueError(f"{name} was removed: {why}; unset it")


def env_flag(name: str, default: bool) -> bool:
    """Whether switch `name` is on: "1" on, "0" off, unset or blank `default`; anything else
    is an error naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"{name}: {raw!r} is neither 0 nor 1")
    return raw == "1"

"""Reading the plugin's on/off environment knobs, one way for all of them."""

from __future__ import annotations

import os


def env_flag(name: str, default: bool) -> bool:
    """The on/off knob ``name``: ``0``/``false`` or ``1``/``true`` (any case, spaces ignored),
    ``default`` when unset or empty; anything else raises one line naming the variable."""
    v = os.environ.get(name, "").strip().lower() or ("1" if default else "0")
    if v not in ("0", "1", "true", "false"):
        raise ValueError(f"{name} must be 0 or 1, got {v!r}")
    return v in ("1", "true")

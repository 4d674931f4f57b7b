"""The forms of the ids a caller may pass in, checked before any file is opened on their word."""

from __future__ import annotations

import re

#: What a snapshot id looks like (``_images.snapshots.new_id``); ids given by a caller must match it.
SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{16}")


def check_snapshot_id(value: object, field: str = "snapshot id") -> str:
    """``value`` if it is a well-formed snapshot id, else ValueError naming it and the form."""
    if not isinstance(value, str) or not SNAPSHOT_ID.fullmatch(value):
        raise ValueError(f"{field} must look like 'snap-' and 16 hex digits (as sb.snapshot() returns), got "
                         f"{value!r}; list the stored ones with 'sandpool snapshots ls'")
    return value

"""Fixtures of the attack tests."""

from __future__ import annotations

import pytest

from sandpool import Session
from sandpool._isolation import probe


@pytest.fixture(params=("namespaces", "oci"))
def contained(request):
    """A Session at each isolation level that claims containment; skips (saying why) where the level
    is unavailable, e.g. no crun for ``oci``."""
    why = probe.unavailable(request.param)
    if why:
        pytest.skip(f"{request.param} level unavailable: {why}")
    with Session(defaults={"isolation": request.param}) as s:
        yield s

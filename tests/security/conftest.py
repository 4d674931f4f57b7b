"""Fixtures of the attack tests."""

from __future__ import annotations

import pytest

from sandpool import Session
from sandpool._isolation import probe


#: Why the ``oci`` level's attack tests need root: sandpool runs crun rootful, and refuses an ordinary
#: user the ``oci`` level (it gets ``namespaces`` through a user namespace instead).
OCI_NEEDS_ROOT = "the oci level runs only as root (an ordinary user gets namespaces, rootless)"


@pytest.fixture(params=("namespaces", pytest.param("oci", marks=pytest.mark.needs_root(OCI_NEEDS_ROOT))))
def contained(request):
    """A Session at each isolation level that claims containment; skips (saying why) where the level
    is unavailable, e.g. no crun for ``oci``."""
    why = probe.unavailable(request.param)
    if why:
        pytest.skip(f"{request.param} level unavailable: {why}")
    with Session(defaults={"isolation": request.param}) as s:
        yield s

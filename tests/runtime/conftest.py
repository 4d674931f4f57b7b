"""Fixtures shared by the Slurm runtime's test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import slurm_helpers as sh


@pytest.fixture(scope="module")
def slurm_conf() -> Iterator[str]:
    """The SLURM_CONF of the test cluster: the CI one when up, else one started for the module
    (and stopped after it)."""
    yield sh.cluster()
    sh.stop_if_started_here()

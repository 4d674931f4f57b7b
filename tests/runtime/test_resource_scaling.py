"""cpu and memory requests larger than the machine run scaled down to it, with one warning; strict mode refuses."""

import warnings

import pytest

from sandpool import SandboxResourceExhaustedError, Session
from sandpool._isolation import admission
from sandpool._isolation.admission import Capacity, Ledger, Request


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.delenv(admission.ENV_STRICT_RESOURCES, raising=False)
    monkeypatch.setattr(admission, "_warned", set())


def test_a_request_above_the_machine_is_scaled_with_one_warning():
    """8 cpus and 64 GiB on a 2-cpu, 1 GiB machine are granted as 2 cpus and 1 GiB; the warning names
    both sides and comes once per distinct request."""
    book = Ledger(Capacity(cpu=2, memory=1 << 30, gpus=()))
    with pytest.warns(UserWarning, match=r"requests 8 cpus, 64\.0 GiB of memory but this machine has 2 cpus and 1\.0 GiB"):
        grant = book.try_grant("a", Request(cpu=8, memory=64 << 30))
    assert (grant.request.cpu, grant.request.memory) == (2, 1 << 30)
    book.release("a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert book.try_grant("b", Request(cpu=8, memory=64 << 30)).request.cpu == 2


def test_strict_mode_refuses_and_gpus_are_always_refused(monkeypatch):
    """SANDPOOL_STRICT_RESOURCES=1 refuses what does not fit; a missing gpu is refused in any mode."""
    book = Ledger(Capacity(cpu=2, memory=1 << 30, gpus=()))
    with pytest.raises(SandboxResourceExhaustedError, match="1 gpus but the machine has none"):
        book.try_grant("a", Request(gpus=1))
    monkeypatch.setenv(admission.ENV_STRICT_RESOURCES, "1")
    with pytest.raises(SandboxResourceExhaustedError, match="unset SANDPOOL_STRICT_RESOURCES"):
        book.try_grant("a", Request(cpu=8))


def test_a_cloud_sized_sandbox_runs_here():
    """resources of 1000 cpus start a working sandbox, with the warning, instead of failing."""
    with Session() as session:
        sb = session.sandbox(resources={"cpu": "1000", "memory": "4Ti"})
        with pytest.warns(UserWarning, match="1000 cpus"):
            sb.wait()
        assert sb.exec(["echo", "ok"]).result().stdout == "ok\n"

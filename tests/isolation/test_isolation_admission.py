"""Admission by requests: what never fits fails at once, what does not fit yet waits, gpus get indices."""

import time

import pytest

from sandpool import SandboxResourceExhaustedError, SandboxStatus, Session
from sandpool._isolation import admission, host
from sandpool._isolation.admission import Capacity, Ledger, Request


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two fake gpus (indices 0 and 1) for the whole process, restored afterwards."""
    monkeypatch.setenv(admission.ENV_FAKE_GPUS, "2")
    host.reset_ledger()
    yield
    monkeypatch.delenv(admission.ENV_FAKE_GPUS)
    host.reset_ledger()


def test_ledger_grants_until_full_then_says_wait():
    """Pure decisions: grants add up to the capacity, a release makes room again."""
    book = Ledger(Capacity(cpu=2, memory=4 << 30, gpus=(0, 1)))
    assert book.try_grant("a", Request(cpu=1.5, memory=1 << 30)) is not None
    assert book.try_grant("b", Request(cpu=1)) is None  # 2.5 > 2: wait
    assert book.try_grant("c", Request(memory=3 << 30)) is not None
    assert book.try_grant("d", Request(memory=1)) is None
    assert "cpu=1.5/2" in repr(book)
    assert book.release("a")
    assert book.try_grant("b", Request(cpu=1)) is not None


def test_ledger_hands_out_distinct_gpu_indices():
    """gpu counts become concrete device indices, never given to two sandboxes at once."""
    book = Ledger(Capacity(cpu=8, memory=0, gpus=(0, 1, 2)))
    first = book.try_grant("a", Request(gpus=2))
    second = book.try_grant("b", Request(gpus=1))
    assert first.gpus == (0, 1) and second.gpus == (2,)
    assert first.environment() == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "0,1"}
    assert book.try_grant("c", Request(gpus=1)) is None
    book.release("a")
    assert book.try_grant("c", Request(gpus=2)).gpus == (0, 1)


def test_requests_that_can_never_fit_are_refused_at_once(monkeypatch):
    """In strict mode 4 cpus on a smaller machine, and always a gpu where there is none: an error
    that names both sides."""
    monkeypatch.setenv(admission.ENV_STRICT_RESOURCES, "1")
    book = Ledger(Capacity(cpu=2, memory=1 << 30, gpus=()))
    with pytest.raises(SandboxResourceExhaustedError, match="4 cpus but the machine has 2"):
        book.try_grant("a", Request(cpu=4))
    with pytest.raises(SandboxResourceExhaustedError, match="1 gpus but the machine has none"):
        book.try_grant("a", Request(gpus=1))


def test_gpu_inventory_from_the_fake_variable(monkeypatch):
    """SANDPOOL_FAKE_GPUS is a count or a list of indices."""
    monkeypatch.setenv(admission.ENV_FAKE_GPUS, "3")
    assert admission.gpu_inventory() == (0, 1, 2)
    monkeypatch.setenv(admission.ENV_FAKE_GPUS, "1,3")
    assert admission.gpu_inventory() == (1, 3)


def test_a_sandbox_asking_for_more_cpus_than_the_machine_fails_clearly(monkeypatch):
    """In strict mode resources cpu=1000 never starts: SandboxResourceExhaustedError, at once."""
    monkeypatch.setenv(admission.ENV_STRICT_RESOURCES, "1")
    with Session() as session:
        sb = session.sandbox(resources={"cpu": "1000"})
        started = time.monotonic()
        with pytest.raises(SandboxResourceExhaustedError, match="can never start here"):
            sb.start().result()
        # at once: not after the 300 s request timeout a sandbox that could fit later waits for
        assert time.monotonic() - started < 30 and sb.status == SandboxStatus.FAILED


def test_gpus_are_allocated_and_visible_as_cuda_visible_devices(fake_gpus):
    """Each sandbox sees its own gpu index; a third waits, and gets one when a sandbox stops."""
    with Session(defaults={"request_timeout_seconds": 30}) as session:
        a, b = session.sandbox(resources={"gpu": 1}), session.sandbox(resources={"gpu": 1})
        seen = {a.exec(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).result().stdout.strip(),
                b.exec(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).result().stdout.strip()}
        assert seen == {"0", "1"}
        late = session.sandbox(resources={"gpu": 1}, request_timeout_seconds=0.3)
        with pytest.raises(SandboxResourceExhaustedError, match="waited 0.3 s"):
            late.start().result()
        waiting = session.sandbox(resources={"gpu": 1})
        ref = waiting.start()  # cannot run while a and b hold both gpus (`late` just proved it waits)
        assert waiting.status != SandboxStatus.RUNNING
        freed = a.exec(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).result().stdout.strip()
        a.stop().result()
        ref.result(timeout=10)
        assert waiting.exec(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]).result().stdout.strip() == freed


def test_no_gpu_here_fails_clearly(monkeypatch):
    """Without an inventory a gpu request fails at once and says how to fake one for tests."""
    monkeypatch.setenv(admission.ENV_FAKE_GPUS, "")
    host.reset_ledger()
    try:
        with Session() as session:
            with pytest.raises(SandboxResourceExhaustedError, match="SANDPOOL_FAKE_GPUS"):
                session.sandbox(resources={"gpu": 1}).start().result()
    finally:
        host.reset_ledger()

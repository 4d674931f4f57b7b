"""Spares that build a sandbox's root ahead of time: a sandbox handed one is exactly the sandbox it
asked for (its own size, hostname, working directory, empty storage), and a spare built for other
plans is never handed a sandbox."""

import importlib
import os
import sys

import pytest

from sandpool import Session
from sandpool._isolation import probe

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")

#: Starts after which a spare has had its chance to build a root (each start refills one).
_MAX_STARTS = 30


def sh(sandbox, script: str) -> str:
    result = sandbox.exec(["sh", "-c", script]).result()
    assert result.returncode == 0, result.stderr
    return result.stdout


def upper_dir(sandbox) -> str:
    """Where the sandbox's writable layer lies on the host, from the overlay's mount options."""
    line = sh(sandbox, "grep -m1 ' overlay ' /proc/self/mountinfo")
    return line.split("upperdir=")[1].split(",")[0]


def tmp_bytes(sandbox) -> int:
    return int(sh(sandbox, "df -B1 --output=size /tmp | tail -1"))


def prebuilt_sandbox(session: Session, **options):
    """Start sandboxes (each stopped again) until one was handed a spare's prebuilt root: its
    writable layer then lies outside its own directory (named by its sandbox id)."""
    for _ in range(_MAX_STARTS):
        sandbox = session.sandbox(**options)
        sandbox.start().result()
        if sandbox.sandbox_id not in upper_dir(sandbox):
            return sandbox
        sandbox.stop(graceful_shutdown_seconds=0).result()
    pytest.fail(f"no sandbox got a prebuilt root in {_MAX_STARTS} starts")


def test_prebuilt_root_is_the_sandboxs_own():
    """A sandbox on a prebuilt root has its own hostname and working directory, the default size,
    the filter, and none of the files an earlier sandbox on a prebuilt root wrote."""
    with Session(defaults={"isolation": "namespaces"}) as session:
        first = prebuilt_sandbox(session)
        sh(first, "echo left > /tmp/left-behind && echo left > /root/left-behind")
        size = tmp_bytes(first)
        first.stop(graceful_shutdown_seconds=0).result()
        second = prebuilt_sandbox(session, working_dir="/srv/job")
        out = sh(second, "hostname; pwd; ls /tmp/left-behind /root/left-behind 2>&1 | grep -c 'No such'; "
                         "grep Seccomp: /proc/self/status").split()
        assert out == [second.sandbox_id, "/srv/job", "2", "Seccomp:", "2"]
        assert tmp_bytes(second) == size
        second.stop(graceful_shutdown_seconds=0).result()


def test_spare_built_for_another_size_is_not_handed_a_sandbox():
    """After spares were built for the default size, a sandbox with a small ephemeral-storage gets
    that size (a fresh root), and so does the next one of that size; the default size still holds
    for a default sandbox afterwards."""
    small = {"resources": {"limits": {"ephemeral-storage": "16Mi"}}}
    with Session(defaults={"isolation": "namespaces"}) as session:
        default = prebuilt_sandbox(session)
        size = tmp_bytes(default)
        default.stop(graceful_shutdown_seconds=0).result()
        for _ in range(2):
            sandbox = session.sandbox(**small)
            assert tmp_bytes(sandbox) == 16 * 2**20
            sandbox.stop(graceful_shutdown_seconds=0).result()
        again = prebuilt_sandbox(session, **small)
        assert tmp_bytes(again) == 16 * 2**20
        again.stop(graceful_shutdown_seconds=0).result()
        sandbox = session.sandbox()
        assert tmp_bytes(sandbox) == size != 16 * 2**20
        sandbox.stop(graceful_shutdown_seconds=0).result()


def test_sandboxes_of_two_roots_in_turn_both_get_prebuilt_roots():
    """Spares keep roots for the last few plans: started in turn, a default sandbox and one with a
    small ephemeral-storage each come to get a prebuilt root of their own size."""
    small = {"resources": {"limits": {"ephemeral-storage": "16Mi"}}}
    with Session(defaults={"isolation": "namespaces"}) as session:
        for _ in range(_MAX_STARTS):
            prebuilt = []
            for options in ({}, small):
                sandbox = session.sandbox(**options)
                sandbox.start().result()
                prebuilt.append(sandbox.sandbox_id not in upper_dir(sandbox))
                if options:
                    assert tmp_bytes(sandbox) == 16 * 2**20
                sandbox.stop(graceful_shutdown_seconds=0).result()
            if all(prebuilt):
                return
        pytest.fail(f"sandboxes of two sizes started in turn never both got prebuilt roots in {_MAX_STARTS} rounds")


def test_client_module_saved_again_is_seen_by_the_next_sandbox(tmp_path, monkeypatch):
    """A client module file bound into prebuilt roots, then saved again by rename (as editors do):
    the next sandbox sees the new file, not the one the spare bound before."""
    module = tmp_path / "startcost_probe_mod.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "startcost_probe_mod", raising=False)
    importlib.import_module("startcost_probe_mod")
    try:
        with Session(defaults={"isolation": "namespaces"}) as session:
            first = prebuilt_sandbox(session)
            assert sh(first, f"cat {module}") == "VALUE = 1\n"
            first.stop(graceful_shutdown_seconds=0).result()
            fresh = tmp_path / "new.py"
            fresh.write_text("VALUE = 2\n")
            os.replace(fresh, module)
            sandbox = session.sandbox()
            assert sh(sandbox, f"cat {module}") == "VALUE = 2\n"
            sandbox.stop(graceful_shutdown_seconds=0).result()
    finally:
        sys.modules.pop("startcost_probe_mod", None)

"""Shared fixtures. Every test runs with a leak check: at teardown no sandbox process or directory
of the test run may remain (templates of still-open runtimes excepted)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile

import pytest

# Set before sandpool creates any runtime, so every sandbox of this run lives under one directory.
STATE_DIR = tempfile.mkdtemp(prefix="sandpool-test-")
os.environ["SANDPOOL_STATE_DIR"] = STATE_DIR

from sandpool import testing  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def _host_dev_null_ok() -> bool:
    return stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail the test if it left a sandbox process, directory or mount behind, or touched the host's
    /dev (sandboxes build their own /dev; the host's must never change)."""
    yield
    report = testing.wait_for_no_leftovers(STATE_DIR, timeout=5.0)
    if report:
        testing.kill_leftovers(report)
        pytest.fail(f"test leaked: {report}")
    if not _host_dev_null_ok():
        os.unlink("/dev/null")
        os.mknod("/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # so later tests still run
        os.chmod("/dev/null", 0o666)
        pytest.fail("the host's /dev/null stopped being a character device during this test")


@pytest.fixture
def state_dir() -> str:
    return STATE_DIR


#: The ordinary (non-root) user that tests run clients and sandboxes as; `.ci/run` creates it.
TEST_USER = os.environ.get("SANDPOOL_TEST_USER", "sandpool-test")


@pytest.fixture(scope="session")
def unprivileged_user():
    """``(name, uid, gid, home)`` of an ordinary user, made with useradd if this run is root and it
    is missing. Skips only when the run is not root (then the run itself is unprivileged)."""
    import pwd
    import subprocess

    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip("not root: cannot create the unprivileged test user")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER], check=True)
        entry = pwd.getpwnam(TEST_USER)
    return entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(STATE_DIR, ignore_errors=True)

"""Shared fixtures and hooks.

Every test runs with a leak check (``leaks.py``): at teardown nothing of a sandbox of the run's state
directory or of the test's ``tmp_path`` may remain, and the host's /dev/null must still be a device.
Servers that fixtures keep across tests are checked when they stop; the whole run once more at the
end of the session, which fails if anything is left.

``SANDPOOL_TEST_STRICT=1`` (set by ``.ci/run``, which installs every requirement of the suite): a
skipped test is a failure, unless it is marked ``ci_may_skip(reason)``.

``needs_root(reason)``: the test means something only when run as root (e.g. the ``oci`` level, or a
root server attacked by an ordinary user); run as an ordinary user it skips, saying the reason. The
ordinary user's CI run (``.ci/run``) deselects these with ``-m "not needs_root"``.
"""

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

import leaks  # noqa: E402

# The tests mirror the package's layout, one folder a layer. Some rerun another layer's scenarios
# (the service contract runs the session and function suites against a server), so every folder's
# modules import by their plain names, as the helpers beside this file do.
_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[1:1] = [os.path.join(_TESTS, d) for d in sorted(os.listdir(_TESTS))
                 if os.path.isfile(os.path.join(_TESTS, d, "__init__.py")) is False
                 and d not in ("__pycache__",) and os.path.isdir(os.path.join(_TESTS, d))
                 and any(f.startswith("test_") for f in os.listdir(os.path.join(_TESTS, d)))]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
STRICT = os.environ.get("SANDPOOL_TEST_STRICT") == "1"
_RUN: dict[str, str] = {}  # "basetemp": the run's tmp_path root, for the check at the session's end


def _host_dev_null_ok() -> bool:
    return stat.S_ISCHR(os.stat("/dev/null").st_mode)


def pytest_configure(config):
    config.addinivalue_line("markers", "ci_may_skip(reason): this test may skip even in CI "
                            "(SANDPOOL_TEST_STRICT=1); the reason says why CI cannot run it")
    config.addinivalue_line("markers", "needs_root(reason): this test needs root (the reason says why); "
                            "run as an ordinary user it skips")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    marker = item.get_closest_marker("needs_root")
    if marker is not None:
        if not marker.args:
            raise pytest.UsageError(f"{item.nodeid}: needs_root takes a reason: needs_root('why')")
        if os.geteuid() != 0:
            pytest.skip(f"needs root: {marker.args[0]}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    leaks.body_starts()


@pytest.fixture(scope="session", autouse=True)
def _run_tmp_root(tmp_path_factory):
    _RUN["basetemp"] = str(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail the test if it left a sandbox process, template, directory, mount, cgroup or network
    namespace behind, or touched the host's /dev (sandboxes build their own /dev; the host's must
    never change)."""
    yield
    tmp_path = request.node.funcargs.get("tmp_path")
    leaks.check("this test", *([str(tmp_path)] if tmp_path else []))
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


@pytest.fixture(scope="session")
def memory_limits_enforced() -> None:
    """Skips, saying why, unless this machine can enforce a memory limit at all: a process in a
    memory cgroup of its own (made here with raw writes, not sandpool's code, so it cannot share
    sandpool's bugs) that allocates past the limit is killed. Where it is, a sandbox that outlives
    its limit is sandpool's failure, never a skip."""
    import subprocess

    from _sandpool_agent.confine import cgroups

    layout = cgroups.detect()
    home = layout.home("memory")
    if os.geteuid() != 0 or home is None:
        pytest.skip(f"no memory cgroup to enforce a limit with (euid {os.geteuid()}, {layout})")
    group = os.path.join(home, f"sandpool-memory-probe-{os.getpid()}")
    os.mkdir(group)
    try:
        v2 = home == layout.v2
        limits = {"memory.max": "32M", "memory.swap.max": "0"} if v2 else {
            "memory.limit_in_bytes": "32M", "memory.memsw.limit_in_bytes": "32M"}
        for name, value in limits.items():
            try:
                with open(os.path.join(group, name), "w") as f:
                    f.write(value)
            except FileNotFoundError:  # no swap accounting: then swap must be off for the limit to bite
                pass
        hog = (f"import os; open('{group}/cgroup.procs', 'w').write(str(os.getpid())); "
               "b = [bytearray(1 << 20) for _ in range(256)]")
        done = subprocess.run([PYTHON, "-c", hog], capture_output=True, timeout=60)
    finally:
        cgroups.remove({"dirs": [group]})  # (retries while the kernel still tears the hog down)
    if done.returncode != -9:
        pytest.skip(f"this machine does not enforce memory limits: a process over a 32 MiB memory cgroup "
                    f"limit ended with {done.returncode}, not SIGKILL ({done.stderr[-200:]!r})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Strict runs: a skip (other than an expected failure's, or a ``ci_may_skip`` test's) fails."""
    outcome = yield
    report = outcome.get_result()
    excused = item.get_closest_marker("ci_may_skip")
    if STRICT and report.skipped and not hasattr(report, "wasxfail") and not (excused and excused.args):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped under SANDPOOL_TEST_STRICT=1, where every requirement is installed: {reason}\n"
                           "(fix the environment, or mark the test ci_may_skip(reason) saying why CI cannot run it)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Strict runs: a module that skips at collection (a module-level skip) fails too."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"collection skipped under SANDPOOL_TEST_STRICT=1: {reason}"


def pytest_sessionfinish(session, exitstatus):
    """Close the shared runtime, then nothing of the run may be left: the session fails if it is."""
    report = leaks.session_leftovers(*([_RUN["basetemp"]] if "basetemp" in _RUN else []))
    if report:
        terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        terminal.write_line(f"\nLEAK at the end of the session: {report}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if not report.mounts:  # never delete below a mount
        shutil.rmtree(STATE_DIR, ignore_errors=True)

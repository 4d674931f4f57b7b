"""Attacks on the filesystem view of a sandbox: what of the host it can reach (namespaces and oci levels).

Each test tries a real attack from inside a sandbox on the host image, asserts it was contained,
and that the sandbox (and another one) still runs commands afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pwd
import secrets
import shutil
import socket
import sys
import tempfile

import pytest

from sandpool import SandboxFileError, Session, testing
from _sandpool_agent.confine import _sys
from sandpool._isolation import hostview, probe
from sandpool._runtime.local import LocalRuntime

import leaks

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def session(contained):
    """A Session at each level that claims containment (``oci`` needs root)."""
    return contained


def sh(sandbox, script: str):
    return sandbox.exec(["sh", "-c", script]).result()


def still_works(session, sandbox) -> None:
    """The attacked sandbox and a fresh one both still run commands."""
    assert sh(sandbox, "echo alive").stdout == "alive\n"
    assert sh(session.sandbox(), "echo alive").stdout == "alive\n"


@pytest.fixture
def host_dir():
    """A fresh directory outside /tmp on the host (beside the repository), removed afterwards."""
    path = tempfile.mkdtemp(prefix=".fsview-", dir=REPO)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def host_home() -> str:
    """The running user's home on the host: /root as root."""
    return pwd.getpwuid(os.geteuid()).pw_dir


def host_top() -> str:
    """Where a test makes host directories that no sandbox may see: ``/`` as root; an ordinary user
    cannot write there, so its own home (itself absent from every sandbox)."""
    return "/" if os.geteuid() == 0 else host_home()


def fingerprint(path: str):
    """What would show a change to ``path`` on the host: its contents' digest where readable (root
    reads /etc/shadow), else its inode, size and modification time."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except PermissionError:
        st = os.stat(path)
        return st.st_ino, st.st_size, st.st_mtime_ns


def bound_ancestors(top: str) -> set[str]:
    """Names directly under ``top`` that a sandbox may show because bound paths lie beneath them
    (the interpreter, sandpool, the client's imported modules), and nothing else."""
    names = set()
    for source, _ in hostview.python_binds(True, os.environ["SANDPOOL_STATE_DIR"], "/nonexistent"):
        if source.startswith(top.rstrip("/") + "/"):
            names.add(source[len(top.rstrip("/")) + 1:].split("/")[0])
    return names


def test_host_data_directories_are_absent(session):
    """/srv, /opt, /boot, /mnt and every other non-system top-level directory are absent, even one
    made after the sandbox started; /var is the sandbox's own; the repository's files are absent."""
    sb = session.sandbox()
    sb.wait()
    late = os.path.join(host_top(), f"sandpool-fsview-{secrets.token_hex(4)}")  # made after the start
    os.mkdir(late)
    try:
        with open(os.path.join(late, "data"), "w") as f:
            f.write("host data")
        top = set(sh(sb, "ls -A /").stdout.split())
        expected = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "root", "home", "var", "proc",
                    "sys", "dev", "tmp", "run"} | bound_ancestors("/")
        assert top <= expected, top - expected
        assert os.path.basename(late) not in top
        for gone in ("/srv", "/opt", "/boot", "/mnt", "/media", late, "/var/lib", "/var/log", "/var/cache"):
            assert sh(sb, f"ls -d {gone}").returncode != 0, gone
        assert sh(sb, "ls -A /var").stdout.split() == ["tmp"]
        assert sb.exec(["cat", os.path.join(REPO, "pyproject.toml")]).result().returncode != 0
        assert sb.exec(["ls", os.path.join(REPO, ".git")]).result().returncode != 0
        assert set(sh(sb, f"ls -A {REPO}").stdout.split()) <= bound_ancestors(REPO)
        with pytest.raises(SandboxFileError):
            sb.read_file(os.path.join(late, "data")).result()
    finally:
        shutil.rmtree(late)
    still_works(session, sb)


def test_homes_show_nothing_of_the_host(session):
    """/root and /home are empty but for the path to a bound interpreter: no dotfiles, no keys (the
    running user's own home included)."""
    marker = os.path.join(host_home(), f".sandpool-fsview-{secrets.token_hex(4)}")
    with open(marker, "w") as f:
        f.write("token")
    try:
        sb = session.sandbox()
        assert set(sh(sb, "ls -A /root").stdout.split()) <= bound_ancestors("/root")
        assert set(sh(sb, "ls -A /home").stdout.split()) <= bound_ancestors("/home")
        for path in (marker, "/root/.bashrc", "/root/.ssh", "/root/.gitconfig"):
            assert sb.exec(["cat", path]).result().returncode != 0, path
        assert sh(sb, "echo mine > /root/note && cat /root/note").stdout == "mine\n"  # a writable home
        with open(marker) as f:
            assert f.read() == "token"
    finally:
        os.unlink(marker)
    still_works(session, sb)


def test_etc_secrets_are_absent_while_etc_and_python_work(session):
    """/etc/shadow, gshadow and TLS private keys are absent; /etc/passwd and python work; writing
    a new /etc/shadow inside changes nothing on the host."""
    before = fingerprint("/etc/shadow")
    sb = session.sandbox()
    for path in ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/sudoers", "/etc/ssl/private"):
        result = sb.exec(["ls", "-d", path]).result()
        assert result.returncode != 0 and "No such file" in result.stderr, path
    with pytest.raises(SandboxFileError) as info:
        sb.read_file("/etc/shadow").result()
    assert info.value.reason == "CWSANDBOX_FILE_NOT_FOUND"
    assert sh(sb, "grep -c '^root:' /etc/passwd").stdout == "1\n"
    assert sb.exec(["python3", "-c", "import ssl, json; print('py ok')"]).result().stdout == "py ok\n"
    assert sh(sb, "echo 'root:x:0:0::/:/bin/sh' > /etc/shadow && cat /etc/shadow").returncode == 0
    assert fingerprint("/etc/shadow") == before
    still_works(session, sb)


def test_state_directory_outside_tmp_is_invisible(host_dir):
    """A runtime whose state dir is outside /tmp: neither its own sandboxes nor another runtime's
    see it (or the default state dir)."""
    state = os.path.join(host_dir, "state")
    runtime = LocalRuntime(state_dir=state)
    try:
        with Session(defaults={"isolation": "namespaces"}, runtime=runtime) as own, \
                Session(defaults={"isolation": "namespaces"}) as other:
            mine, theirs = own.sandbox(), other.sandbox()
            mine.write_file("/proof", b"x").result()
            assert os.listdir(state)  # the owner dir and the sandbox's files are there on the host
            for sb in (mine, theirs):
                for path in (state, host_dir, os.environ["SANDPOOL_STATE_DIR"]):
                    assert sb.exec(["ls", "-d", path]).result().returncode != 0, path
            still_works(own, mine)
            still_works(other, theirs)
    finally:
        leaks.close_runtime(runtime)
        assert not testing.wait_for_no_leftovers(state, timeout=5.0)


def test_secret_beside_a_client_module_is_unreadable_while_its_function_runs(host_dir):
    """A module beside a secret.env, imported by the client: its function (pickled by reference)
    runs in the sandbox, which has the module's source but not the secret next to it."""
    name = f"fsview_helper_{secrets.token_hex(4)}"
    secret = os.path.join(host_dir, "secret.env")
    with open(secret, "w") as f:
        f.write("API_KEY=hunter2\n")
    with open(os.path.join(host_dir, f"{name}.py"), "w") as f:
        f.write("import os, socket\n"
                "def peek(path):\n"
                "    here = os.path.dirname(os.path.abspath(__file__))\n"
                "    try:\n"
                "        with open(path) as f:\n"
                "            found = f.read()\n"
                "    except OSError as exc:\n"
                "        found = type(exc).__name__\n"
                "    return socket.gethostname(), sorted(os.listdir(here)), found\n")
    sys.path.insert(0, host_dir)
    try:
        helper = importlib.import_module(name)
        with Session(defaults={"isolation": "namespaces"}) as session:
            peek = session.function(helper.peek)
            host, listing, found = peek(secret)
            assert host != socket.gethostname()  # it ran in a sandbox
            assert found == "FileNotFoundError" and "secret.env" not in listing and f"{name}.py" in listing
            sb = session.sandbox()
            assert sb.exec(["cat", secret]).result().returncode != 0
            assert peek(secret)[2] == "FileNotFoundError"  # the warm sandbox still serves calls
            still_works(session, sb)
    finally:
        sys.path.remove(host_dir)
        sys.modules.pop(name, None)


def test_proc_files_that_leak_the_host_are_masked(session):
    """Docker's masked /proc paths read empty (the host's keyrings and timers do not show) and
    /sys/firmware is an empty directory."""
    sb = session.sandbox()
    for path in ("/proc/keys", "/proc/key-users", "/proc/timer_list", "/proc/kcore", "/proc/sched_debug"):
        if os.path.exists(path):
            assert sb.exec(["wc", "-c", path]).result().stdout.split()[0] == "0", path
    for path in ("/proc/acpi", "/proc/scsi", "/sys/firmware"):
        if os.path.isdir(path):
            assert sh(sb, f"ls -A {path}").stdout == "", path
            assert sh(sb, f"touch {path}/x").returncode != 0
    still_works(session, sb)


def test_proc_sys_and_sysrq_are_read_only(session):
    """Writing a sysctl (the hostname, through /proc/sys), /proc/sysrq-trigger or /proc/fs fails;
    the host's values are unchanged."""
    host_name = socket.gethostname()
    sb = session.sandbox()
    scripts = ["echo pwned > /proc/sys/kernel/hostname", "echo 1 > /proc/sys/vm/drop_caches",
               "echo 1 > /proc/sys/kernel/core_pattern"]
    if os.path.exists("/proc/sysrq-trigger"):  # (a kernel built without magic SysRq has none)
        scripts.append("echo h > /proc/sysrq-trigger")
    for script in scripts:
        result = sh(sb, script)
        assert result.returncode != 0 and "Read-only file system" in result.stderr, script
    mounts = dict(line.split()[4:6] for line in sh(sb, "cat /proc/self/mountinfo").stdout.splitlines())
    for path in ("/proc/sys", "/proc/fs", "/proc/irq", "/proc/bus", "/proc/sysrq-trigger"):
        if os.path.exists(path):
            assert "ro" in mounts[path].split(","), (path, mounts.get(path))
    assert socket.gethostname() == host_name
    still_works(session, sb)


def test_file_api_symlinks_and_dotdot_stay_inside(session):
    """read_file/write_file through '..' and symlinks (to /, to host paths) reach only the
    sandbox's own root: nothing is read from or written to the host."""
    sb = session.sandbox()
    target = f"/tmp/sandpool-fsview-{secrets.token_hex(4)}"
    sh(sb, f"ln -s / /tmp/up && ln -s {REPO} /tmp/repo && ln -s /etc/shadow /tmp/shadow && ln -s /.. /tmp/dd")
    for path in ("/../../etc/shadow", "/tmp/shadow", "/tmp/up/etc/shadow", f"/tmp/repo/pyproject.toml",
                 f"/tmp/dd/../..{REPO}/pyproject.toml", "/proc/1/root/etc/shadow", "/proc/self/cwd/../etc/shadow"):
        with pytest.raises(SandboxFileError):
            sb.read_file(path).result()
    sb.write_file(f"/../../..{target}", b"inside").result()
    sb.write_file(f"/tmp/up/tmp/dd/../..{target}-2", b"inside").result()
    assert not os.path.exists(target) and not os.path.exists(target + "-2")
    assert sb.read_file(target).result() == b"inside"
    still_works(session, sb)


def test_double_chroot_and_pivot_root_do_not_leave_the_sandbox(session):
    """The classic escape (chroot into a subdirectory, walk up past it, chroot to '.') ends in the
    sandbox's own root, with the host's directories still absent; pivot_root and mount are refused."""
    marker = os.path.join(host_top(), f"sandpool-fsview-{secrets.token_hex(4)}")
    os.mkdir(marker)
    try:
        escape = (
            "import json, os\n"
            "os.makedirs('/tmp/jail', exist_ok=True)\n"
            "outer = os.open('/', os.O_RDONLY)\n"
            "os.chroot('/tmp/jail')\n"
            "os.fchdir(outer)\n"
            "for _ in range(64):\n"
            "    os.chdir('..')\n"
            "os.chroot('.')\n"
            "print(json.dumps(os.listdir('/')))\n"
        )
        sb = session.sandbox()
        result = sb.exec(["python3", "-c", escape]).result()
        assert result.returncode == 0, result.stderr
        seen = set(json.loads(result.stdout))
        assert os.path.basename(marker) not in seen and "srv" not in seen and "opt" not in seen
        pivot = ("import ctypes, os\n"
                 "os.makedirs('/tmp/new/old', exist_ok=True)\n"
                 "libc = ctypes.CDLL(None, use_errno=True)\n"
                 "print(libc.mount(b'/tmp/new', b'/tmp/new', None, 0x1000, None), ctypes.get_errno())\n"
                 f"print(libc.syscall({_sys._SYS_PIVOT_ROOT}, b'/tmp/new', b'/tmp/new/old'), ctypes.get_errno())\n")
        out = sb.exec(["python3", "-c", pivot]).result().stdout.split()
        assert out[0] == "-1" and out[2] == "-1" and out[1] == out[3] == "1", out  # EPERM, EPERM
        still_works(session, sb)
    finally:
        os.rmdir(marker)

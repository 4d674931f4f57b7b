"""The on-disk state of local sandboxes: one owner directory per template, swept when stale.

Layout: ``<state dir>/o-<pid>-<hex>/`` per owner (a ``template`` file holds the template's pid and
kernel start time), and inside it ``sb-<id>/root/`` per sandbox. A directory whose template is gone
is stale: its processes are killed and, unless something is still mounted under it, it is removed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile

from _sandpool_agent import linux as _linux
from _sandpool_agent.confine import cgroups as _cgroups

from .._isolation import bridge as _bridge

ENV_STATE_DIR = "SANDPOOL_STATE_DIR"


def default_state_dir() -> str:
    """``$SANDPOOL_STATE_DIR``, else a per-user directory under the system temp dir."""
    return os.environ.get(ENV_STATE_DIR) or os.path.join(tempfile.gettempdir(), f"sandpool-{os.getuid()}")


def new_owner_dir(state_dir: str) -> str:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, f"o-{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(path, 0o700)
    return path


def record_template(owner_dir: str, pid: int) -> None:
    with open(os.path.join(owner_dir, "template"), "w") as f:
        f.write(f"{pid} {_linux.process_start_time(pid)}\n")


def _owner_alive(owner_dir: str) -> bool:
    try:
        with open(os.path.join(owner_dir, "template")) as f:
            pid_text, start = f.read().split()
    except (OSError, ValueError):
        # no template file yet: alive only if the creating process still runs
        pid_text = os.path.basename(owner_dir).split("-")[1]
        return _linux.process_start_time(int(pid_text)) is not None
    return _linux.process_start_time(int(pid_text)) == start


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].encode().decode("unicode_escape")
                if point == real or point.startswith(real + "/"):
                    found.append(point)
    except OSError:
        pass
    return found


def processes_mentioning(path: str) -> list[int]:
    """Pids of sandbox processes under ``path``: the command line names it (the template and the
    agents it forked) or the environment's ``SANDPOOL_ROOT`` lies under it (exec'd commands)."""
    pids = []
    needle, env_needle = path.encode(), b"SANDPOOL_ROOT=" + path.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found = needle in f.read()
            if not found:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    found = env_needle in f.read()
        except OSError:
            continue
        if found:
            pids.append(int(entry))
    return pids


def sweep(state_dir: str) -> list[str]:
    """Kill and remove what dead owners left in ``state_dir``; return the directories removed."""
    removed: list[str] = []
    _cgroups.sweep(state_dir, _owner_alive)  # kills their processes too
    _bridge.sweep(state_dir, _owner_alive)  # their bridge sandboxes' nft chains
    try:
        entries = os.listdir(state_dir)
    except FileNotFoundError:
        return removed
    for name in entries:
        path = os.path.join(state_dir, name)
        if name.startswith("o-") and not _owner_alive(path) and remove_owner_dir(path):
            removed.append(path)
    return removed


def remove_owner_dir(path: str) -> bool:
    """Kill what still runs under a dead owner's directory and remove it; False if a mount stays."""
    for pid in processes_mentioning(path):
        _linux.kill_quietly(pid, signal.SIGKILL)
    _cgroups.remove_owner(path)
    if mounts_under(path):
        return False  # never delete under a mount; the isolation layer unmounts first
    shutil.rmtree(path, ignore_errors=True)
    return True

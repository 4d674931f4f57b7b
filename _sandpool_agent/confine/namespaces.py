"""The ``namespaces`` level, sandbox side: run in the forked agent before it serves.

The template forks the agent into a new pid namespace (``fork_into_pid_namespace``), so the agent is
PID 1 there and the template still reaps it directly. The agent then calls ``enter(plan)``: new
mount, uts, ipc, cgroup and (unless the network is shared) net namespaces; a root filesystem
(``mount_root``) made the root with pivot_root; a fresh ``/proc`` (Docker's masked paths covered, its
dangerous files read-only), read-only ``/sys`` (``/sys/firmware`` covered), ``/tmp``, ``/run`` and
``/dev/shm`` on the sandbox's size-limited tmpfs (see ``storage``), a minimal ``/dev``; the
hostname; ``lo`` up; then no_new_privs and a container's capability set.

The root of an image is one overlay (lower = the image, upper and work dirs on that tmpfs). The
root of the host image is an allow-list, not the host's ``/``: a directory of that tmpfs holding
empty ``/root``, ``/home`` and ``/var/tmp``, into which the host's system directories (``/usr``,
``/etc``, ``/lib*``, ...; symlinks such as ``/bin -> usr/bin`` copied as symlinks) are bound
from one overlay of the host's ``/``, so writes there land in the sandbox's upper dir and nothing
else of the host (``/work``, ``/srv``, ``/opt``, ``/var``, homes, other top-level directories, even
ones made later) exists inside. Secrets of ``/etc`` are whited out by a small tmpfs layer in that
overlay, so they are absent, not just unreadable.

``enter`` is ``build_root`` (everything up to the pivot_root, and the old root's detach) then
``finish`` (what is the sandbox's own: home and working directory, hostname, privileges); a spare
runs ``build_root`` ahead of time (see ``sandbox``).

Every mount lives in the sandbox's own mount namespace, so nothing appears in the host's mount
table and everything is unmounted by the kernel when the sandbox's last process exits.

Rootless (``plan["rootless"]``: the template runs in a user namespace, see ``userns``), the
kernel refuses two of these steps, and they are done another way: ``/dev``'s device nodes are bind
mounts of the host's (mknod of a device is not allowed in a user namespace), and with the host's
network ``/sys`` is a read-only bind of the host's (a fresh sysfs needs a network namespace of the
sandbox's own user namespace). A read-only remount keeps the mount's other flags, which a user
namespace may not clear.

Stdlib only: the template imports this module.
"""

from __future__ import annotations

import os
import socket
import stat
import sys

from . import _sys, netsetup, storage, volumes

#: What exec'd processes keep (Docker's default set minus MKNOD and NET_RAW): no mount, no module
#: loading, no raw devices, no ptrace across the pid namespace boundary, no clock or sysctl changes.
KEEP_CAPABILITIES = {
    0,   # CHOWN
    1,   # DAC_OVERRIDE
    3,   # FOWNER
    4,   # FSETID
    5,   # KILL (only reaches processes of the sandbox's own pid namespace)
    6,   # SETGID
    7,   # SETUID
    8,   # SETPCAP
    10,  # NET_BIND_SERVICE
    18,  # SYS_CHROOT
    29,  # AUDIT_WRITE
    31,  # SETFCAP
}
#: Inside ``/proc``: made read-only (root may otherwise write sysctls or trigger sysrq on the host).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
#: Docker's masked paths: files covered by /dev/null, directories by an empty read-only tmpfs.
#: They leak host state (kernel memory, the host's keyrings, timers, devices) or reach firmware.
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/key-users",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap")
#: Character devices of the minimal ``/dev``: name -> (major, minor).
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
#: The agent's own directory inside the sandbox (the main command's log); on the /run tmpfs.
AGENT_DIR = "/run/sandpool"

_NOSUID_NODEV = _sys.MS_NOSUID | _sys.MS_NODEV


def fork_into_pid_namespace(own_pid_ns_fd: int) -> int:
    """``os.fork()`` whose child is PID 1 of a new pid namespace; the caller's own children stay put.

    unshare(CLONE_NEWPID) only changes the namespace of children forked afterwards, so the caller
    switches back (``setns`` to ``own_pid_ns_fd``) right after the fork. No second fork is needed,
    and the returned pid is the child's host pid, a direct child of the caller.
    """
    _sys.unshare(_sys.CLONE_NEWPID)
    pid = -1
    try:
        pid = _sys.fork()
        return pid
    finally:
        if pid != 0:  # the parent, even when the fork failed
            _sys.setns(own_pid_ns_fd, _sys.CLONE_NEWPID)


def fork_into_pid_namespace_rootless() -> int:
    """``fork_into_pid_namespace`` for a template in a user namespace, which may not ``setns`` back
    to its own pid namespace (the host's, not its user namespace's): a short-lived middle child
    makes the new pid namespace and forks PID 1 of it, reports that pid and exits. The template is
    a subreaper, so the new child becomes its direct child; the child waits for that (the middle
    child's exit) before it goes on, so its parent-death signal and parent checks see the template.
    """
    reader, writer = os.pipe()
    middle = _sys.fork()
    if middle == 0:
        code = 1
        try:
            os.close(reader)
            gone_r, gone_w = os.pipe()  # EOF for the new child when this middle child is gone
            _sys.unshare(_sys.CLONE_NEWPID)
            pid = _sys.fork()
            if pid == 0:
                os.close(writer)
                os.close(gone_w)
                os.read(gone_r, 1)
                os.close(gone_r)
                return 0
            os.write(writer, pid.to_bytes(4, "little"))
            code = 0
        except BaseException:
            pass
        os._exit(code)
    os.close(writer)
    try:
        data = os.read(reader, 4)
    finally:
        os.close(reader)
        os.waitpid(middle, 0)
    if len(data) != 4:
        raise OSError(1, "fork into a new pid namespace (rootless) failed")
    return int.from_bytes(data, "little")


def namespace_flags(network: str) -> int:
    """``unshare`` flags for the agent (the pid namespace is made by the template's fork)."""
    flags = _sys.CLONE_NEWNS | _sys.CLONE_NEWUTS | _sys.CLONE_NEWIPC | _sys.CLONE_NEWCGROUP
    return flags | (_sys.CLONE_NEWNET if network == "none" else 0)


def unshare_early(network: str, cgroup: bool = False) -> None:
    """The part of ``enter`` that needs nothing of the sandbox: mount, uts, ipc and net namespaces,
    private mounts, ``lo`` up. Spares do it ahead of time; the cgroup namespace too (``cgroup``) when
    the spare is already in the cgroup it will keep, else it waits for the join."""
    _sys.unshare(namespace_flags(network) & ~(0 if cgroup else _sys.CLONE_NEWCGROUP))
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)  # nothing propagates to the host
    if network == "none":
        _sys.loopback_up()


def enter(plan: dict, early: bool = False, cgroupns: bool = False, holder: socket.socket | None = None) -> None:
    """Become the sandbox: namespaces, root filesystem, hostname, network, privileges. See module doc.

    ``plan`` keys: ``lower`` (the image's root), ``upper``, ``work``, ``merged``, ``stage`` (dirs on
    the host), ``view`` (the host image's allow-list, see ``mount_root``; absent for other images),
    ``hostname``, ``network`` ("none" or "host"), ``scratch`` (the dir holding upper and work, where
    ``storage`` mounts the sandbox's writable tmpfs), ``tmp_bytes`` (its size, shared by the upper
    layer, the host image's root, /tmp, /run and /dev/shm),
    ``hide`` ([path, writable] pairs: directories of the image covered by an empty tmpfs),
    ``binds`` ([source, target] read-only bind mounts of directories or files, target inside the
    sandbox; made after the hiding and the tmpfs mounts, so they may bring back part of a hidden
    directory), ``mkdirs`` (directories to create), ``paths`` (directories the agent's ``sys.path``
    gets at its end, where missing: where the client's modules lie).
    ``early``: ``unshare_early`` ran already (in a spare); ``cgroupns``: so did the cgroup namespace.
    ``holder``: the template's socket that takes the writable storage's descriptor (``storage.hold``).
    Raises OSError naming the failed step.
    """
    if not early:
        unshare_early(plan["network"])
    netsetup.join(plan)  # the bridge mode's namespace, made by the client (before /sys is mounted)
    if not cgroupns:
        _sys.unshare(_sys.CLONE_NEWCGROUP)
    build_root(plan, holder)
    finish(plan)


def root_key(plan: dict) -> str:
    """What of ``plan`` the root ``build_root`` makes depends on, other than where its scratch
    directory lies: two plans with the same key get the same root."""
    return repr([plan.get(k) for k in ("network", "lower", "view", "tmp_bytes", "hide", "binds", "snapshot", "volumes")])


def relocated(plan: dict, scratch: str) -> dict:
    """``plan`` with its scratch tree (upper, work, merged, stage) in the directory ``scratch``: a
    spare builds a root there before it knows its sandbox's directory (see ``build_root``)."""
    moved = {key: os.path.join(scratch, key) for key in ("upper", "work", "merged", "stage")}
    return {**plan, "scratch": scratch, **moved}


def build_root(plan: dict, holder: socket.socket | None = None) -> None:
    """The part of ``enter`` that depends only on what ``root_key`` names: the writable storage,
    the root filesystem and its mounts, then pivot_root into it. A spare does this ahead of time
    for a plan its template saw lately (``relocated`` to a directory of its own), so the host's
    root is detached from it before it is handed a sandbox. Nothing of ``plan`` but those keys
    and the scratch tree is read; afterwards nothing of the host is reachable."""
    merged = plan["merged"]
    storage.mount(plan)
    storage.hold(plan, holder)  # the writable tmpfs, for snapshots, held by the template
    mount_root(plan)
    size = plan["tmp_bytes"]
    _mount_proc(merged)
    _mount_sys(_mkdir(merged, "/sys"), plan)
    _mask(merged, "/sys/")
    _make_dev(_mkdir(merged, "/dev"), plan)
    for tree in ("tmp", "run"):
        storage.bind(plan, tree, _mkdir(merged, "/" + tree))
    os.makedirs(_inside(merged, AGENT_DIR), 0o700)
    for path, writable in plan.get("hide") or ():
        if os.path.isdir(_inside(merged, path)):
            flags = _NOSUID_NODEV | (0 if writable else _sys.MS_RDONLY)
            _sys.mount("tmpfs", _inside(merged, path), "tmpfs", flags, f"mode=755,size={size if writable else 4096}")
    for source, target in plan.get("binds") or ():
        try:
            directory = stat.S_ISDIR(os.stat(source).st_mode)
        except FileNotFoundError:  # a client's module deleted since the plan was made: not needed
            continue
        path = _mount_point(merged, target, directory)
        _sys.mount(source, path, None, _sys.MS_BIND | _sys.MS_REC)
        _read_only(path)
    volumes.mount(plan.get("volumes") or (), merged)
    os.chdir(merged)
    _sys.pivot_root(".", ".")  # stack the new root on the old one, then detach the old one
    _sys.umount(".", _sys.MNT_DETACH)  # (waits for an RCU grace period: ~0.5-2 ms)
    os.chdir("/")


def finish(plan: dict) -> None:
    """Inside the root ``build_root`` made: the sandbox's own directories (home, working
    directory), hostname and import path, then no_new_privs and a container's capability set."""
    for path in plan.get("mkdirs") or ():
        os.makedirs(path, exist_ok=True)  # inside the root: a symlink of the image stays inside too
    _sys.sethostname(plan["hostname"])
    sys.path.extend(p for p in plan.get("paths") or () if p not in sys.path)
    _sys.no_new_privs()
    _sys.limit_capabilities(KEEP_CAPABILITIES)


def mount_root(plan: dict) -> None:
    """Mount the sandbox's root filesystem at ``plan["merged"]`` (the oci level calls this too).

    Without ``plan["view"]``: one overlay, lower = ``plan["lower"]``. With it (the host image), the
    root is the ``root`` tree of ``storage`` (on the sandbox's size-limited tmpfs), and ``view`` says
    what it holds: ``links``
    ({name: target}: symlinks at the top, such as bin -> usr/bin), ``dirs`` ([path, mode] pairs:
    empty directories), ``shown`` (names of top-level directories of ``lower``, bound in from one
    overlay of ``lower`` whose upper and work dirs are the plan's, so writes there land in the
    upper dir) and ``whiteouts`` (paths relative to ``lower`` that are absent in that overlay). The
    overlay itself and its whiteout layer are mounted under ``plan["stage"]``, a directory
    outside the new root, and go with the old root (no umount here: each costs an RCU grace
    period). Nothing but the shown directories is reachable, however the host's ``/`` changes later.
    """
    merged, upper, work = plan["merged"], plan["upper"], plan["work"]
    view = plan.get("view")
    snap = plan.get("snapshot")  # {"upper": lowerdirs, "root": lowerdirs}: a snapshot's layers, top first
    if view is None:  # (rootless: the layers' opaque dirs carry user.overlay.* xattrs, see _images.rootless)
        lower = f"{snap['upper']}:{plan['lower']}" if snap else plan["lower"]
        extra = ",userxattr" if plan.get("rootless") else ""
        try:
            _sys.mount("overlay", merged, "overlay", _sys.MS_NOSUID,
                       f"lowerdir={lower},upperdir={upper},workdir={work}{extra}")
        except OSError as exc:
            if not plan.get("rootless"):
                raise
            print(f"sandpool: {exc}; copying the image's layers instead (Linux < 5.11?)", file=sys.stderr)
            storage.copy_layers(lower, storage.tree(plan, "root"))
            storage.bind(plan, "root", merged)
        return
    if snap:  # the root tree over the snapshot's, writes still on the sandbox's tmpfs
        _sys.mount("overlay", merged, "overlay", _sys.MS_NOSUID, f"lowerdir={snap['root']},upperdir="
                   f"{storage.tree(plan, 'root')},workdir={_mkdir(plan['scratch'], 'rootwork')}")
    else:
        storage.bind(plan, "root", merged)  # on the sandbox's writable tmpfs, with /tmp and the upper layer
    for name, target in view["links"].items():
        os.symlink(target, _inside(merged, name))
    for path, mode in view["dirs"]:
        os.chmod(_mkdir(merged, path), mode)  # (makedirs obeys the umask)
    stage = plan["stage"]  # outside the new root: what is mounted there goes with the old root
    os.makedirs(stage, exist_ok=True)
    _sys.mount("tmpfs", stage, "tmpfs", _NOSUID_NODEV, "mode=700,size=64k")
    lower = plan["lower"]
    if plan.get("rootless"):
        _mount_shown_rootless(plan, view, stage)
        return
    if view["whiteouts"]:
        lower = f"{_whiteout_layer(_mkdir(stage, 'hidden'), view['whiteouts'])}:{lower}"
    if snap:  # the host's / may not share an overlay with a layer stored on it: stack on a read-only one
        _sys.mount("overlay", _mkdir(stage, "base"), "overlay", _sys.MS_NOSUID | _sys.MS_RDONLY, f"lowerdir={lower}")
        lower = f"{snap['upper']}:{os.path.join(stage, 'base')}"
    host = _mkdir(stage, "host")
    _sys.mount("overlay", host, "overlay", _sys.MS_NOSUID, f"lowerdir={lower},upperdir={upper},workdir={work}")
    for name in view["shown"]:
        _sys.mount(os.path.join(host, name), _mkdir(merged, name), None, _sys.MS_BIND)


def _mount_shown_rootless(plan: dict, view: dict, stage: str) -> None:
    """Rootless, the host's ``/`` cannot be an overlay's lower layer (its submounts are locked in a
    user namespace, and overlayfs refuses a layer it cannot clone whole), so each shown directory is
    an overlay of its own: lower = that directory (under its part of the whiteout layer), upper and
    work = its subdirectory of the plan's, so writes land where the single overlay puts them. A
    shown directory with submounts of its own cannot be a layer either; it is bound read-only."""
    merged, upper, work, lower = plan["merged"], plan["upper"], plan["work"], plan["lower"]
    for name in view["shown"]:
        layers = os.path.join(lower, name)
        hidden = [rel.split("/", 1)[1] for rel in view["whiteouts"] if rel.startswith(name + "/")]
        if hidden:
            layers = f"{_whiteout_layer(_mkdir(stage, 'hidden-' + name), hidden)}:{layers}"
        target = _mkdir(merged, name)
        try:
            _sys.mount("overlay", target, "overlay", _sys.MS_NOSUID,
                       f"lowerdir={layers},upperdir={_mkdir(upper, name)},workdir={_mkdir(work, name)}")
        except OSError:
            _sys.mount(os.path.join(lower, name), target, None, _sys.MS_BIND | _sys.MS_REC)
            _read_only(target)


def _whiteout_layer(path: str, hidden: list[str]) -> str:
    """``path`` (on a tmpfs) filled with an overlay whiteout (a 0/0 character device) for each of
    the ``hidden`` relative paths: stacked above a lower layer, it makes them absent. On a tmpfs,
    because overlayfs refuses a layer that lies inside another layer (the host's ``/``)."""
    made = {""}
    for rel in hidden:
        parent = os.path.dirname(rel)
        if parent not in made:  # (one makedirs per directory: most whiteouts share /etc)
            os.makedirs(f"{path}/{parent}", exist_ok=True)
            made.add(parent)
        os.mknod(f"{path}/{rel}", stat.S_IFCHR, 0)
    return path


def _inside(merged: str, path: str) -> str:
    return f"{merged}/{path.lstrip('/')}"


def _mkdir(merged: str, path: str) -> str:
    """``path`` inside ``merged``, made (with its parents) unless it is there. One mkdir where its
    parent exists, as on most of a start's ~20 calls (``os.makedirs`` stats each parent first)."""
    full = _inside(merged, path)
    try:
        os.mkdir(full)
    except FileExistsError:
        if not os.path.isdir(full):
            raise
    except FileNotFoundError:
        os.makedirs(full, exist_ok=True)
    return full


def _mount_point(merged: str, path: str, directory: bool) -> str:
    """``path`` inside ``merged``, made as a directory or as an empty file (for a file's bind)."""
    if directory:
        return _mkdir(merged, path)
    _mkdir(merged, os.path.dirname(path))
    full = _inside(merged, path)
    os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return full


def _mask(merged: str, prefix: str) -> None:
    """Cover the ``MASKED_PATHS`` under ``prefix`` that exist (inside ``merged``): a file with
    /dev/null (the host's: /dev is not made yet), a directory with an empty read-only tmpfs."""
    for masked in MASKED_PATHS:
        full = _inside(merged, masked)
        try:
            is_dir = stat.S_ISDIR(os.lstat(full).st_mode) if masked.startswith(prefix) else None
        except OSError:
            continue
        if is_dir:
            _sys.mount("tmpfs", full, "tmpfs", _sys.MS_RDONLY | _NOSUID_NODEV | _sys.MS_NOEXEC, "mode=555,size=4k")
        elif is_dir is not None:
            _sys.mount("/dev/null", full, None, _sys.MS_BIND)


def _mount_proc(merged: str) -> None:
    path = _mkdir(merged, "/proc")
    _sys.mount("proc", path, "proc", _NOSUID_NODEV | _sys.MS_NOEXEC)
    _mask(merged, "/proc/")
    for name in PROC_READ_ONLY:
        target = os.path.join(path, name)
        if os.path.exists(target):
            _sys.mount(target, target, None, _sys.MS_BIND)
            _read_only(target)


#: Mount flags a remount must repeat (statvfs's ST_* bits have the MS_* values): in a user
#: namespace the kernel refuses to clear them on a mount it inherited.
_KEPT_FLAGS = _NOSUID_NODEV | _sys.MS_NOEXEC | 0x400 | 0x800 | 0x1000  # noatime, nodiratime, relatime


def _read_only(path: str) -> None:
    """Remount the bind mount at ``path`` read-only, its other flags kept."""
    kept = os.statvfs(path).f_flag & _KEPT_FLAGS
    _sys.mount(None, path, None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY | kept)


def _mount_sys(path: str, plan: dict) -> None:
    """A fresh read-only sysfs; rootless with the host's network, a read-only bind of the host's."""
    if not (plan.get("rootless") and plan["network"] != "none"):
        _sys.mount("sysfs", path, "sysfs", _sys.MS_RDONLY | _NOSUID_NODEV | _sys.MS_NOEXEC)
        return
    _sys.mount("/sys", path, None, _sys.MS_BIND | _sys.MS_REC)
    _read_only(path)


def _make_dev(dev: str, plan: dict) -> None:
    _sys.mount("tmpfs", dev, "tmpfs", _sys.MS_NOSUID | _sys.MS_NOEXEC, "mode=755,size=64k")
    for name, (major, minor) in DEVICES.items():
        node = os.path.join(dev, name)
        if plan.get("rootless"):  # the host's node, bound onto an empty file
            os.close(os.open(node, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
            _sys.mount(os.path.join("/dev", name), node, None, _sys.MS_BIND)
            continue
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(node, 0o666)  # mknod obeys the umask
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"))
    _sys.mount("devpts", os.path.join(dev, "pts"), "devpts", _sys.MS_NOSUID | _sys.MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=620")
    os.mkdir(os.path.join(dev, "shm"))
    storage.bind(plan, "shm", os.path.join(dev, "shm"))

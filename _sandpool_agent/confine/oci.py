"""The ``oci`` level: the sandbox is an OCI bundle run by crun, sharing the image store and cgroups.

The template forks a child as for the ``process`` level; ``run(config, sock_fd)`` then, in that child:
joins the sandbox's cgroups (created by the runtime, as for ``namespaces``), makes a private mount
namespace, mounts the sandbox's writable tmpfs and on it the overlay's upper/work dirs (``storage``)
and the overlay (lower = the image), writes the bundle's ``config.json`` and execs ``crun run``,
passing the agent's socket as fd 3. Inside, a fresh interpreter runs the agent as PID 1, in the
namespaces, mounts, capability set and syscall filter of the namespaces level
(``seccomp.oci_section``), with Docker's masked and read-only /proc paths. crun's cgroup manager is
off: the container stays in the cgroups the child joined, so limits, OOM handling and the final
``cgroup.kill`` are the same as at the namespaces level. A ``bridge`` sandbox's network namespace is
the one the client made (``plan["netns"]``, as for the namespaces level): crun joins it by path. crun keeps its state under the sandbox dir
(``--root``), so nothing is left in ``/run/crun``.

On a hybrid cgroup host crun 1.8 refuses to run ("cgroups in hybrid mode not supported"); the child
hides the v2 mount inside its own mount namespace, which changes nothing for anyone else.
Stdlib only: this runs in the template's child.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from . import _sys, cgroups, namespaces, seccomp, storage

_CAP_NAMES = {0: "CHOWN", 1: "DAC_OVERRIDE", 3: "FOWNER", 4: "FSETID", 5: "KILL", 6: "SETGID", 7: "SETUID",
              8: "SETPCAP", 10: "NET_BIND_SERVICE", 18: "SYS_CHROOT", 29: "AUDIT_WRITE", 31: "SETFCAP"}
_BOOT = (
    "import sys,json,os,socket;"
    "c=json.loads(sys.argv[1]);sys.path[:0]=[c.pop('_package')]+c.pop('_paths');"
    "os.makedirs(c['dir'],exist_ok=True);os.chdir(c['cwd']);"
    "from _sandpool_agent import agent;agent.serve(socket.socket(fileno=3),c)"
)


def runtime_binary() -> str | None:
    return shutil.which("crun") or next((p for p in ("/usr/bin/crun", "/usr/local/bin/crun") if os.path.exists(p)), None)


def bundle_config(config: dict, plan: dict) -> dict:
    """The OCI runtime spec (config.json) for a sandbox; ``plan`` is its namespaces plan."""
    size = plan["tmp_bytes"]
    caps = [f"CAP_{_CAP_NAMES[c]}" for c in sorted(namespaces.KEEP_CAPABILITIES)]
    inside = {k: config[k] for k in ("sandbox_id", "root", "cwd", "env", "argv", "lifetime", "idle_timeout")
              if k in config}
    paths = [p for p in sys.path if p]
    paths += [p for p in plan.get("paths") or () if p not in paths]  # where the client's modules lie
    inside.update(dir=namespaces.AGENT_DIR, _paths=paths, _package=_package_dir())
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        _tree_mount(plan, "shm", "/dev/shm"),
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        _tree_mount(plan, "tmp", "/tmp"),
        _tree_mount(plan, "run", "/run"),
    ]
    for path, writable in plan.get("hide") or ():
        under_tmpfs = any(path.startswith(d + "/") for d in ("/tmp", "/run"))  # hidden by those mounts already
        if not under_tmpfs and os.path.isdir(os.path.join(plan["merged"], path.lstrip("/"))):  # (mounted by now)
            mounts.append({"destination": path, "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=755"] + ([f"size={size}"] if writable else ["ro", "size=4k"])})
    for source, target in plan.get("binds") or ():
        mounts.append({"destination": target, "type": "bind", "source": source, "options": ["rbind", "ro"]})
    namespaces_ = [{"type": kind} for kind in ("pid", "mount", "ipc", "uts", "cgroup")]
    if plan.get("netns"):  # bridge: the namespace the client made (crun joins it by path)
        namespaces_.append({"type": "network", "path": plan["netns"]})
    elif plan["network"] == "none":
        namespaces_.append({"type": "network"})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
            "args": [sys.executable, "-I", "-S", "-c", _BOOT, json.dumps(inside)],
            "env": [f"{k}={v}" for k, v in config["env"].items()],
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []},
            "noNewPrivileges": True,
        },
        "root": {"path": plan["merged"], "readonly": False},
        "hostname": plan["hostname"],
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces_,
            "maskedPaths": list(namespaces.MASKED_PATHS),
            "readonlyPaths": [f"/proc/{name}" for name in namespaces.PROC_READ_ONLY],
            "seccomp": seccomp.oci_section(),  # crun loads it just before it execs the agent
        },
    }


def run(config: dict, sock_fd: int) -> None:
    """In the template's child: set up and exec crun. Never returns (OSError if something refuses)."""
    plan = config["oci"]
    _sys.unshare(_sys.CLONE_NEWNS)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    layout = cgroups.detect()
    if layout.mode == "hybrid" and layout.v2:
        _sys.umount(layout.v2)  # crun 1.8 refuses hybrid hosts; hidden in this namespace only
    storage.mount(plan)  # the writable tmpfs, under the overlay's upper layer and /tmp, /run, /dev/shm
    namespaces.mount_root(plan)  # the host image's allow-list, or the image's overlay
    for path in plan.get("mkdirs") or ():
        os.makedirs(os.path.join(plan["merged"], path.lstrip("/")), exist_ok=True)
    bundle = os.path.join(config["dir"], "bundle")
    os.makedirs(bundle, exist_ok=True)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(bundle_config(config, plan), f)
    os.dup2(sock_fd, 3)
    crun = runtime_binary()
    if crun is None:
        raise OSError(2, "crun is not installed (apt-get install crun)")
    os.execv(crun, [crun, "--root", os.path.join(config["dir"], "crun"), "--cgroup-manager=disabled",
                    "run", "--preserve-fds", "1", "--bundle", bundle, config["sandbox_id"]])


def _tree_mount(plan: dict, name: str, destination: str) -> dict:
    return {"destination": destination, "type": "bind", "source": storage.tree(plan, name),
            "options": ["rbind", "nosuid", "nodev"]}


def _package_dir() -> str:
    """The directory that holds ``_sandpool_agent`` (sys.path's entry for it)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

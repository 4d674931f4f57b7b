"""Snapshots and volumes, runtime side: add them to a sandbox's plan at start, capture a running one.

``apply(record, config, state_dir)`` runs after ``Isolation.prepare`` made the spawn config: it adds
the volumes' mounts, and for ``restore_from_snapshot_id`` the snapshot's layers (``plan["snapshot"]``:
lower dirs stacked over the image's, and the lock files the agent holds shared while it runs on
them; see ``_sandpool_agent.confine.namespaces.mount_root``). A snapshot's layers were written by a
sandbox, so before any start every path the root's construction walks on the host side (mount
points, the host image's directories and links, binds, volumes) is checked to be no symlink in them.

``capture(record, trigger)`` (blocking; call it in a thread) copies the sandbox's writable layers
into the snapshot store (``sandpool._images.snapshots``) while its cgroup is frozen, so every
process of it stands still during the copy: the template, outside the sandbox, holds its writable
tmpfs open (``storage.hold``), and the client reads ``/proc/<template>/fd/<n>/upper`` (and
``root``, the host image's root tree). Without a cgroup freezer (no cgroup v2 here) the copy runs beside the
sandbox: each file is read whole, but files written during the copy may be seen at different moments.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .._errors import SandboxFailedError
from .._errors_cw import SandboxSnapshotError, SnapshotNotSupportedError
from .._images import snapshots as store_mod
from .._images import treecopy
from .._images.store import MAX_LOWERDIR
from . import images, probe, volumes
from _sandpool_agent.confine import namespaces

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord

#: How long capture waits for the kernel to report the cgroup frozen.
FREEZE_WAIT_SECONDS = 2.0
_SNAPSHOT_LEVELS = ("namespaces", "oci")


def store() -> store_mod.SnapshotStore:
    return store_mod.SnapshotStore(images.store_dir())


def apply(record: SandboxRecord, config: dict[str, Any], state_dir: str) -> None:
    """Add ``record``'s volumes and snapshot to its spawn ``config``; SandboxFailedError if they cannot be."""
    spec = record.spec
    plan = config.get("namespaces") or config.get("oci")
    try:
        mounts = volumes.entries(spec.volumes, state_dir)
        if mounts and record.isolation != "namespaces":
            raise ValueError(f"volumes need isolation='namespaces' (this sandbox runs at {record.isolation!r})")
        if plan is not None:
            plan["volumes"] = mounts
            record.extra["snapshot_base"] = {"image": spec.container_image, "lower": plan["lower"], "layers": [],
                                             "view": bool(plan.get("view")),
                                             "links": sorted((plan.get("view") or {}).get("links") or ())}
        if spec.restore_from_snapshot_id:
            _restore(record, plan, spec.restore_from_snapshot_id)
    except (ValueError, OSError, store_mod.SnapshotNotFound) as exc:
        release(record.extra.pop("snapshot_locks", []))
        raise SandboxFailedError(str(exc), sandbox_id=record.sandbox_id, status_reason="InvalidSpec") from exc


def _restore(record: SandboxRecord, plan: dict[str, Any] | None, snapshot_id: str) -> None:
    if plan is None or probe.rootless():
        raise ValueError(f"restore_from_snapshot_id needs isolation='namespaces' or 'oci' as root (this sandbox "
                         f"runs at {record.isolation!r}{', rootless' if probe.rootless() else ''})")
    snaps = store()
    snap = snaps.get(snapshot_id)
    if snap.image != record.spec.container_image:
        raise ValueError(f"snapshot {snapshot_id} was taken of image {snap.image!r}; start it with "
                         f"container_image={snap.image!r} (this sandbox asks for {record.spec.container_image!r})")
    if not plan.get("view"):
        plan["lower"] = snap.base_lower  # the image's layers it was taken on, even if the tag moved since
    parts = {part: ":".join(snaps.layer_part(d, part) for d in snap.layers) for part in ("upper", "root")}
    record.extra["snapshot_locks"] = _lock_shared([snaps.lock_path(d) for d in snap.layers])
    missing = [d for d in snap.layers if not snaps.has_layer(d)]  # (with the locks held: nothing removes them now)
    if missing:
        raise ValueError(f"snapshot {snapshot_id} lacks its layer {missing[0]} (removed from {snaps.base}); "
                         f"take the snapshot again")
    if len(parts["upper"]) + len(plan["lower"]) > MAX_LOWERDIR:
        raise ValueError(f"snapshot {snapshot_id}'s {len(snap.layers)} layers (a chain of restores) and its image's "
                         f"do not fit one overlay mount ({MAX_LOWERDIR} bytes of paths); restore an earlier snapshot, "
                         f"or use a shorter SANDPOOL_IMAGE_DIR")
    plan["snapshot"] = parts
    _check_no_symlinks(plan, snap, snaps)
    record.extra["snapshot_base"].update(layers=list(snap.layers), lower=plan["lower"])


def _lock_shared(paths: list[str]) -> list[int]:
    """Descriptors holding each lock file shared: while they are open, no ``prune`` removes the layer.
    The runtime holds them (never the agent, whose descriptors the sandbox's root can reopen)."""
    fds = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            fcntl.flock(fds[-1], fcntl.LOCK_SH)
    except BaseException:
        release(fds)
        raise
    return fds


def release(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def hold_until_exit(record: SandboxRecord) -> None:
    """Keep ``record``'s snapshot layers locked until its agent is gone (or the runtime closes)."""
    try:
        await record.exited.wait()
    finally:
        release(record.extra.pop("snapshot_locks", []))


def _walked_paths(plan: dict[str, Any]) -> set[str]:
    """Paths of the root that its construction resolves on the host side, before the pivot_root."""
    paths = {"/proc", "/sys", "/dev", "/tmp", "/run", namespaces.AGENT_DIR}
    paths.update(path for path, _ in plan.get("hide") or ())
    paths.update(target for _, target in plan.get("binds") or ())
    paths.update(entry["target"] for entry in plan.get("volumes") or ())
    view = plan.get("view") or {}
    paths.update("/" + name for name in view.get("links") or ())
    paths.update("/" + name for name in view.get("shown") or ())
    paths.update(path for path, _ in view.get("dirs") or ())
    return paths


def _check_no_symlinks(plan: dict[str, Any], snap: store_mod.SnapshotRecord, snaps: store_mod.SnapshotStore) -> None:
    parts = ("upper", "root") if plan.get("view") else ("upper",)
    for path in sorted(_walked_paths(plan)):
        names = [n for n in path.split("/") if n]
        for digest in snap.layers:
            for part in parts:
                here = snaps.layer_part(digest, part)
                for name in names:
                    here = os.path.join(here, name)
                    try:
                        mode = os.lstat(here).st_mode
                    except OSError:
                        break
                    if stat.S_ISLNK(mode):
                        raise ValueError(f"snapshot {snap.snapshot_id} has a symlink at "
                                         f"{here[len(snaps.layer_part(digest, part)):]}, where a sandbox's root "
                                         f"needs a directory of its own; it cannot be restored")


# -- capture ------------------------------------------------------------------------------------


def refusal(record: SandboxRecord) -> str | None:
    """Why ``record`` cannot be snapshotted, or None."""
    if record.isolation not in _SNAPSHOT_LEVELS:
        return (f"sandbox {record.sandbox_id} runs at isolation={record.isolation!r}, which has no writable "
                f"layer of its own to capture; start it with isolation='namespaces' to snapshot it")
    if probe.rootless():
        return "snapshots need root: a rootless sandbox's layers cannot hold the overlay's whiteouts"
    if "snapshot_base" not in record.extra:
        return f"sandbox {record.sandbox_id} has no writable layer to capture"
    return None


def capture(record: SandboxRecord, trigger: str = "manual") -> store_mod.SnapshotRecord:
    """Copy ``record``'s writable layers into the store (its cgroup frozen meanwhile); the record.
    SnapshotNotSupportedError for a sandbox that has none, SandboxSnapshotError if the copy fails."""
    why = refusal(record)
    if why:
        raise SnapshotNotSupportedError(why, sandbox_id=record.sandbox_id, feature="snapshot")
    base = record.extra["snapshot_base"]
    snaps = store()
    started = time.perf_counter()
    work = ""
    try:
        work = snaps.new_work_dir()
        source = _source(record)
        os.mkdir(work, 0o700)
        copied = treecopy.Copied()
        with _frozen(record.extra.get("cgroups")):
            treecopy.copy_tree(os.path.join(source, "upper"), os.path.join(work, "upper"), copied=copied)
            if base["view"]:  # the host image: its root tree is written too
                copied.hash.update(b"\0root tree\0")
                treecopy.copy_tree(os.path.join(source, "root"), os.path.join(work, "root"),
                                   skip_top=frozenset(base["links"]), copied=copied)
            else:
                os.mkdir(os.path.join(work, "root"), 0o700)
        digest = copied.hash.hexdigest()
        locks = _lock_shared([snaps.lock_path(digest)])  # until a record names it: no prune takes it meanwhile
    except OSError as exc:
        if work:
            shutil.rmtree(work, ignore_errors=True)
        cause = exc if _held_storage(record.agent_pid) else _NOT_HELD
        raise SandboxSnapshotError(f"could not snapshot sandbox {record.sandbox_id}: {cause}",
                                   sandbox_id=record.sandbox_id) from exc
    try:
        snaps.commit_layer(digest, work, copied.bytes)
        snap = store_mod.SnapshotRecord(
            snapshot_id=store_mod.new_id(), layers=(digest, *base["layers"]), image=base["image"],
            base_lower=base["lower"], view=base["view"], source_sandbox_id=record.sandbox_id, trigger=trigger,
            created=time.time(), size_bytes=copied.bytes, seconds=time.perf_counter() - started)
        snaps.save(snap)
    finally:
        release(locks)
    return snap


def _source(record: SandboxRecord) -> str:
    """Where the client reads the sandbox's writable tmpfs: the agent's descriptor (namespaces), or
    the mount in crun's mount namespace (oci)."""
    pid = record.agent_pid
    if pid is None or record.exited.is_set():
        raise OSError(3, "the sandbox is not running")
    if record.isolation == "oci":
        return f"/proc/{pid}/root{record.extra['dir']}/fs"
    # (the agent sends the descriptor before it serves, but the template, busy with other sandboxes,
    # may not have taken it off its socket yet: a bounded wait, a snapshot being a rare, heavy call)
    deadline = time.monotonic() + _HOLD_WAIT_SECONDS
    while (held := _held_storage(pid)) is None:
        if record.exited.is_set() or time.monotonic() > deadline:
            raise OSError(2, _NOT_HELD)
        time.sleep(_HOLD_POLL_SECONDS)
    return held


#: How long a snapshot waits for the template to take a new sandbox's storage, and how often it looks.
_HOLD_WAIT_SECONDS = 5.0
_HOLD_POLL_SECONDS = 0.002
_NOT_HELD = "the sandbox's writable storage is not held by its template (is the sandbox ending?)"


def _held_storage(agent: int | None) -> str | None:
    """``/proc/<template>/fd/<n>``: the template's descriptor of the sandbox's writable tmpfs
    (``storage.hold``). The template is the agent's parent; of its descriptors, the one on the
    filesystem of the sandbox's ``/tmp`` (a directory of that tmpfs, and a mount point the sandbox
    cannot change): each tmpfs is a device of its own."""
    try:
        with open(f"/proc/{agent}/stat") as f:
            template = int(f.read().rpartition(") ")[2].split()[1])
        device = os.stat(f"/proc/{agent}/root/tmp").st_dev
        fds = os.listdir(f"/proc/{template}/fd")
    except (OSError, ValueError, IndexError):
        return None
    for fd in fds:
        path = f"/proc/{template}/fd/{fd}"
        try:
            if os.stat(path).st_dev == device and os.path.isdir(f"{path}/upper"):
                return path
        except OSError:
            continue
    return None


@contextlib.contextmanager
def _frozen(group: dict[str, Any] | None) -> Iterator[None]:
    """Freeze the cgroup v2 ``group`` (every process of the sandbox) for the block, if there is one."""
    freeze = os.path.join(os.path.dirname(group["kill"]), "cgroup.freeze") if group and group.get("kill") else None
    if freeze is None or not os.path.exists(freeze):
        yield
        return
    _write(freeze, "1")
    try:
        _wait_frozen(os.path.join(os.path.dirname(freeze), "cgroup.events"))
        yield
    finally:
        _write(freeze, "0")


def _wait_frozen(events: str) -> None:
    deadline = time.monotonic() + FREEZE_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with open(events) as f:
                if "frozen 1" in f.read():
                    return
        except OSError:
            return
        time.sleep(0.0005)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)

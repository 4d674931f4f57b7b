"""The runtime's side of isolation (runs in its trio loop): choose the level, admit, build the config.

``LocalRuntime`` calls ``level`` when it creates a record, ``prepare`` before it asks the template to
spawn (admission by requests, then the level's part of the spawn config: network, image, cgroups,
the namespaces plan, environment), ``release`` when the agent is reaped (or the spawn failed), and
``close`` when it closes. ``cgroups.sweep`` runs with the state dir's sweep; the template does the
rest (see ``sandbox``).

Rootless (an ordinary user's namespaces level, see ``userns``): no cgroups (this machine delegates
no cgroup v2 controller to a user), so the ``process`` level's rlimits stand in where they can
(memory limit -> RLIMIT_DATA, pids limit -> RLIMIT_NPROC), and what nothing enforces (``cpu``) is
named once in a warning. Registry images work rootless too (``sandpool._images.rootless``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
from typing import TYPE_CHECKING, Any

import trio

from .._config import SandboxSpec
from .._errors import SandboxFailedError, SandboxResourceExhaustedError
from .._images.errors import ImageError
from .._quantity import parse_memory
from . import admission, bridge, hostview, images, network, pods, probe
from _sandpool_agent.confine import cgroups, namespaces, storage

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord

#: The PATH of a sandbox's commands without the client's python first (an image's programs come first).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: pids.max of a namespaces sandbox that sets no pids limit: a fork bomb stops here.
DEFAULT_PIDS_LIMIT = 1024
#: How often a request that waits for capacity re-checks even without a release in this runtime.
_ADMISSION_POLL_SECONDS = 0.25

_ledger_lock = threading.Lock()
_ledger: admission.Ledger | None = None


def ledger() -> admission.Ledger:
    """The process's admission ledger (created on first use, from this machine's capacity)."""
    global _ledger
    with _ledger_lock:
        if _ledger is None:
            _ledger = admission.Ledger(admission.machine_capacity())
        return _ledger


def use_ledger(book: admission.Ledger) -> None:
    """Make ``book`` the process's ledger (a Slurm job's: what Slurm allocated on the node, no more)."""
    global _ledger
    with _ledger_lock:
        _ledger = book


def reset_ledger() -> None:
    """Forget the ledger, so the next use re-reads the capacity (tests change the gpu inventory)."""
    global _ledger
    with _ledger_lock:
        _ledger = None


class Isolation:
    """Per-runtime isolation state: the cgroup layout, grants, and who waits for capacity."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.key = cgroups.state_key(state_dir)
        self._layout: cgroups.Layout | None = None
        self._released = trio.Event()

    def __repr__(self) -> str:
        return f"<Isolation auto={probe.best()} {self.layout!r} {ledger()!r}>"

    @property
    def layout(self) -> cgroups.Layout:
        if self._layout is None:
            self._layout = cgroups.detect()
        return self._layout

    # -- level -----------------------------------------------------------------------------

    def level(self, spec: SandboxSpec) -> str:
        """The level a sandbox of ``spec`` gets; SandboxFailedError if the asked one is unavailable."""
        wanted = spec.isolation
        if wanted == "auto":
            return probe.best()
        why = probe.unavailable(wanted)
        if why:
            raise SandboxFailedError(f"isolation={wanted!r} is not available here: {why}; use isolation='auto' "
                                     f"for the strongest level this machine has", status_reason="IsolationUnavailable")
        return wanted

    # -- start -----------------------------------------------------------------------------

    async def prepare(self, record: SandboxRecord, config: dict[str, Any], owner_dir: str) -> None:
        """Admit ``record`` (waiting for capacity) and add its level's part to the spawn ``config``.

        Raises SandboxResourceExhaustedError when its requests can never fit, or did not fit within
        ``request_timeout_seconds``; SandboxFailedError for an unknown image or network option.
        """
        try:
            await self._prepare(record, config, owner_dir)
        except BaseException:
            self.release(record)
            shutil.rmtree(config["dir"], ignore_errors=True)  # no agent, so no template to remove it
            raise

    async def _prepare(self, record: SandboxRecord, config: dict[str, Any], owner_dir: str) -> None:
        spec: SandboxSpec = record.spec
        try:
            mode = network.resolve(spec.network, record.isolation, spec.services)
            lower = images.resolve(spec.container_image, fetch=False)
            if lower is None and record.isolation != "process":  # a registry image to pull first, in a thread
                lower = await trio.to_thread.run_sync(images.resolve, spec.container_image, abandon_on_cancel=True)
        except (ValueError, TypeError, ImageError) as exc:
            raise SandboxFailedError(str(exc), sandbox_id=record.sandbox_id, status_reason="InvalidSpec") from exc
        if record.isolation == "process" and lower != "/":
            raise SandboxFailedError(
                f"image {spec.container_image!r} needs isolation='namespaces' (the process level runs on the host "
                f"image); use container_image='host' or set {images.ENV_FALLBACK}=host", status_reason="InvalidSpec")
        grant = await self._admit(record)
        config["isolation"] = record.isolation
        config["env"].update(grant.environment())
        if record.isolation in ("namespaces", "oci"):
            assert lower is not None  # (resolve with fetch=True pulls the image or raises)
            self._namespaces_config(record, config, owner_dir, mode, lower)
            member = pods.prepare(record, config, config["namespaces"], mode)  # a pod's further container
            if mode == "bridge" and not member:
                await bridge.prepare(record, config, config["namespaces"], self.key, owner_dir)
        if record.isolation == "oci":
            config["oci"] = config.pop("namespaces")  # the same plan, carried out by crun

    async def _admit(self, record: SandboxRecord) -> admission.Grant:
        request = admission.Request.of(record.spec.resources)
        book = ledger()
        book.check(request)
        deadline = trio.current_time() + record.spec.request_timeout_seconds
        while (grant := book.try_grant(record.sandbox_id, request)) is None:
            if trio.current_time() >= deadline:
                raise SandboxResourceExhaustedError(book.waiting_message(request, record.spec.request_timeout_seconds),
                                                    sandbox_id=record.sandbox_id, reason="InsufficientResources")
            with trio.move_on_after(min(_ADMISSION_POLL_SECONDS, max(0.0, deadline - trio.current_time()))):
                await self._released.wait()
        record.extra["grant"] = grant
        return grant

    def _namespaces_config(self, record: SandboxRecord, config: dict[str, Any], owner_dir: str, mode: str,
                           lower: str) -> None:
        spec: SandboxSpec = record.spec
        fs = os.path.join(config["dir"], "fs")
        host_image = lower == "/"
        plan = {
            "lower": lower, "upper": os.path.join(fs, "upper"), "work": os.path.join(fs, "work"),
            "merged": os.path.join(fs, "merged"), "scratch": fs, "hostname": record.sandbox_id, "network": mode,
            "stage": config["root"],  # the process level's root dir: made already, unused at this level
            "tmp_bytes": _tmp_bytes(spec), "hide": _hidden(self.state_dir),
            "binds": hostview.python_binds(host_image, self.state_dir, images.store_dir()),
        }
        plan["paths"] = hostview.client_paths(plan["binds"])
        if probe.rootless():
            plan["rootless"] = True
        if host_image:
            plan["view"] = hostview.host_view()
        if record.isolation == "namespaces":  # its tmpfs over the owner's dir, as a spare's: nothing to make or remove
            plan = namespaces.relocated(plan, owner_dir)
            if mode == "bridge":
                os.makedirs(config["dir"], exist_ok=True)  # (where slirp4netns's socket goes)
        else:
            os.makedirs(fs, exist_ok=True)  # the mount point of the sandbox's tmpfs, where upper, work and merged are made
        home = "/root"
        image_env, image_cwd = images.settings(spec.container_image)  # a pulled image's Env and WorkingDir
        cwd = spec.working_dir or image_cwd or "/"
        plan["mkdirs"] = [home, cwd]
        config["namespaces"] = plan
        config["root"], config["cwd"] = "/", cwd
        env = config["env"]
        user_env = spec.environment_variables
        defaults = {"HOME": home, "TMPDIR": "/tmp", "SANDPOOL_ROOT": "/"}
        if lower != "/":

            defaults["PATH"] = BASE_PATH  # the image's programs, not the host's python first
        for pair in image_env:  # (each has a '='), under the spec's environment_variables
            name, _, value = pair.partition("=")
            defaults[name] = value
        env.update({k: v for k, v in defaults.items() if k not in user_env})
        layout = self.layout
        if os.geteuid() == 0 and layout.mode != "none":
            res = spec.resources
            group = cgroups.plan(layout, self.key, os.path.basename(owner_dir), record.sandbox_id,
                                 with_memory=bool(res and res.memory_limit))
            limits = cgroups.limit_files(
                layout, group, res.memory_limit if res else None, res.cpu_limit if res else None,
                (res.pids_limit if res else None) or DEFAULT_PIDS_LIMIT)
            try:
                cgroups.create(layout, group, limits)
            except OSError as exc:
                cgroups.remove(group)
                raise SandboxFailedError(f"cannot set up the cgroups of {record.sandbox_id}: {exc}",
                                         sandbox_id=record.sandbox_id, status_reason="CgroupError") from exc
            config["cgroups"] = {**group, "limits": limits}  # a spare adopting the group writes them again
            config["rlimits"] = {}  # the cgroup limits memory and processes; rlimits would pre-empt OOM
            record.extra["cgroups"] = group
        elif spec.resources is not None and spec.resources.cpu_limit:
            _not_enforced("cpu", "no cgroup here" if os.geteuid() == 0 else "rootless, with no delegated cgroup")

    async def started(self, record: SandboxRecord, nursery: trio.Nursery) -> None:
        """The agent answered its handshake (it is in its namespaces): the bridge network's part."""
        await bridge.started(record, nursery)
        pods.started(record)

    # -- end -------------------------------------------------------------------------------

    def release(self, record: SandboxRecord, reaped: dict[str, Any] | None = None) -> None:
        """The agent is gone (``reaped`` is the template's frame) or never started (None)."""
        if reaped is not None and reaped.get("oom_killed"):
            record.oom_killed = True
        bridge.release(record, spawned=reaped is not None)
        pods.release(record)
        group = record.extra.pop("cgroups", None)
        if group is not None and reaped is None:
            cgroups.remove(group)  # never spawned: the template does not know this group
        if record.extra.pop("grant", None) is not None and ledger().release(record.sandbox_id):
            self._released.set()
            self._released = trio.Event()

    def close(self, owner_dir: str | None) -> None:
        """Remove this owner's (by now empty) cgroup directories."""
        if owner_dir is not None:
            cgroups.remove_owner(owner_dir)


@functools.cache
def _not_enforced(resource: str, why: str) -> None:
    """Say once per process that a requested ``resource`` limit is not enforced, and why."""
    logging.getLogger("sandpool").warning(
        "the %s limit of sandboxes is not enforced at the namespaces level here (%s); memory and pids "
        "limits are enforced as rlimits", resource, why)


def _tmp_bytes(spec: SandboxSpec) -> int:
    """Size of the sandbox's writable storage (``storage``): upper layer, /tmp, /run, /dev/shm."""
    res = spec.resources
    limit = res.limits.get("ephemeral-storage") if res and res.limits else None
    return storage.size_bytes(None if limit is None else parse_memory(limit), res.memory_limit if res else None)


def _hidden(state_dir: str) -> list[list[str | bool]]:
    """Directories to cover with an empty read-only tmpfs where the image shows them: sandpool's
    state (other sandboxes' files) and its image store. The host image shows neither unless they
    lie in one of its system directories; other runtimes' state directories lie outside those."""
    return [[hostview.realpath(state_dir), False], [hostview.realpath(images.store_dir()), False]]

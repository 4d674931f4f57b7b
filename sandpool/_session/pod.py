"""Several containers in one sandbox (a pod), client side (mixed into ``Sandbox``).

A sandbox whose spec has more than one container (``sandpool._pods``) is its primary container;
each further container is a sandbox of its own that the pod owns and never shows (not tracked by
a session, not listed): built with the pod (no I/O), started by the pod's start right after the
primary's agent runs (all at once), joined to the primary's network namespace by the runtime
(``Runtime.join_pod``), stopped with the pod, and stopped when the primary's main command ends
(the primary owns the pod's lifecycle, as in cwsandbox). A container that fails to start fails the
pod's start, and every container is stopped.

``container=NAME`` of exec, the file methods, ``stream_logs`` and ``shell`` picks the container
(``_in``): None, "" or the primary's name is the primary (cwsandbox's default); an unknown name
raises ValueError naming the pod's containers.

``Sandbox.run_from_file`` (a compose-style file, ``sandpool._compose``) and
``Sandbox.run_from_template`` (a stored spec, ``sandpool._templates``) build pods (or single
sandboxes) with cwsandbox's signatures.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Self

import trio

from .. import _compose, _pods
from .._options_cw import secret_values
from .._config import SandboxStatus
from .._core.lifecycle import Phase
from .._cwtypes import ContainerStatus, SandboxControl, SandboxFileType
from .._cwtypes import Container as _Container
from .._errors import SandboxFailedError
from .._errors_cw import NotSupportedLocallyError
from .parts import SandboxParts

if TYPE_CHECKING:
    from .._runtime.contract import Runtime, SandboxRecord

__all__ = ["PodMixin"]


class PodMixin(SandboxParts):
    """The pod part of Sandbox (see the module doc)."""

    _pod_join: Callable[[], Awaitable[SandboxRecord]] | None = None  # a further container's: its primary's _agent_record
    _members: dict[str, Self]  # a pod's further containers by name (empty for one container)
    _agent_up: trio.Event  # the primary's agent runs, or its start failed: its members may go on

    def _init_pod(self: Self, join: Callable[[], Awaitable[SandboxRecord]] | None) -> None:
        """In ``__init__`` (no I/O): build the further containers' sandboxes, or (in one of them) note
        how to wait for its primary's agent (``join``: the primary's ``_agent_record``)."""
        # (``self: Self`` so that mypy types ``type(self)(...)`` as this class, not PodMixin)
        self._pod_join = join
        self._agent_up = trio.Event()
        self._members = {}
        rows = self._spec.containers or ()
        if len(rows) > 1:
            first = _pods.primary(rows)
            for row in rows:
                if row is not first:
                    spec = dataclasses.replace(self._spec, **_pods.member_options(row, secret_values))
                    self._members[row["name"]] = type(self)(_home=self._home, _spec=spec,
                                                            _pod_join=self._agent_record)

    # -- which container -------------------------------------------------------------------

    def _in(self, container: str | None) -> Self:
        """The sandbox that runs ``container`` (None, "" or the primary's name: this one);
        ValueError naming the containers for any other name."""
        if container in (None, "", self._primary_name()):
            return self
        if not isinstance(container, str):
            raise TypeError(f"container must be a container's name (str) or None, got {container!r}")
        member = self._members.get(container)
        if member is None:
            names = ", ".join(repr(n) for n in self._container_names())
            raise ValueError(f"container={container!r}: this sandbox has no such container; its containers are "
                             f"{names} (None means the primary, {self._primary_name()!r})")
        return member

    def container_sandbox(self, container: str | None) -> Self:
        """The sandbox that runs ``container`` (as ``container=`` picks it), for sandpool's own
        services (the cwsandbox service reads each container's main log); not a user API: pass
        ``container=`` to exec, the file methods and ``stream_logs``."""
        return self._in(container)

    def _primary_name(self) -> str:
        rows = self._spec.containers
        return (_pods.primary(rows)["name"] or _pods.PRIMARY_NAME) if rows else _pods.PRIMARY_NAME

    def _container_names(self) -> list[str]:
        return [self._primary_name(), *self._members]

    # -- start and stop --------------------------------------------------------------------

    async def _join_pod(self, runtime: Runtime) -> None:
        """In a further container's start, after its record exists: wait until the primary's agent
        runs (starting the pod if it was not), then have the runtime join its network."""
        if self._pod_join is None or self._record is None:
            return
        runtime.join_pod(self._record, await self._pod_join())

    async def _agent_record(self) -> SandboxRecord:
        """(A primary's, for its members:) its record once its agent runs, starting the pod if it was
        not; SandboxFailedError if it did not start or has ended."""
        self.start()
        await self._agent_up.wait()
        if self._record is None or self._state.phase is not Phase.RUNNING:
            raise SandboxFailedError("its pod's primary container is not running", sandbox_id=self.sandbox_id,
                                     status_reason="PodEnded")
        return self._record

    async def _start_members(self) -> None:
        """In the primary's start, once it runs: start every further container (at once). One that
        fails stops the pod and raises SandboxFailedError naming it."""
        self._agent_up.set()
        if not self._members:
            return
        failures: list[str] = []

        async def start(name: str, member: SandboxParts) -> None:
            try:
                await member.start()
            except Exception as exc:
                failures.append(f"container {name!r}: {exc}")

        async with trio.open_nursery() as nursery:
            for name, member in self._members.items():
                nursery.start_soon(start, name, member)
        if failures:
            with trio.CancelScope(shield=True):
                await self._stop_members(0.0)
                if self._record is not None:  # (it is: the primary runs)
                    await self._runtime.stop(self._record, 0.0)
            raise SandboxFailedError(f"sandbox {self.sandbox_id} failed to start: {'; '.join(failures)}",
                                     sandbox_id=self.sandbox_id, status_reason=failures[0])
        self._host.nursery.start_soon(self._end_with_primary)

    async def _end_with_primary(self) -> None:
        """The primary owns the pod: when it ends (its command exited, or it was stopped), so do the others."""
        await self._terminal.wait()
        await self._stop_members(0.0)

    async def _stop_members(self, grace: float) -> None:
        """Stop every further container (at once); waits until each has ended."""
        self._agent_up.set()  # (a member waiting for a primary that never ran gives up)
        if not self._members:
            return
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for member in self._members.values():
                    nursery.start_soon(_stop_quietly, member, grace)

    # -- what cwsandbox reports ----------------------------------------------------------------

    @property
    def containers(self) -> tuple[_Container, ...]:
        """The pod's containers as asked for (empty for a sandbox created without ``containers=``)."""
        return tuple(_Container(**{k: v for k, v in row.items() if k != "secrets"})
                     for row in self._spec.containers or ())

    @property
    def container_statuses(self) -> tuple[ContainerStatus, ...]:
        """One row per container, the primary first: its name, state and exit code."""
        if self.status is None:
            return ()
        rows = [ContainerStatus(name=self._primary_name(), state=self.status, exit_code=self.returncode)]
        for name, member in self._members.items():
            rows.append(ContainerStatus(name=name, state=member.status or SandboxStatus.PENDING,
                                        exit_code=member.returncode))
        return tuple(rows)

    # -- pods from files and templates ---------------------------------------------------------

    @classmethod
    def run_from_template(cls, template_id: str, /, *args: str, command: str | None = None,
                          defaults: Any = None, **kwargs: Any) -> Self:
        """Start a sandbox from the stored template ``template_id`` (``sandpool templates ls``);
        ``command``/``args`` and any option given replace the template's (an explicit container
        option replaces its ``containers``). ValueError if there is no such template."""
        if not template_id:
            raise ValueError("template_id must not be empty; list the templates with 'sandpool templates ls'")
        if command is not None:
            return cls.run(command, *args, template_id=template_id, defaults=defaults, **kwargs)
        if args:
            raise ValueError(f"args={list(args)!r} without command: local images have no entrypoint to pass "
                             f"them to; give command= too")
        return cls.run(template_id=template_id, defaults=defaults, **kwargs)

    @classmethod
    def run_from_file(cls, contents: str | os.PathLike[str] | bytes, /, *, primary_service: str | None = None,
                      file_type: SandboxFileType | str = SandboxFileType.COMPOSE,
                      control: SandboxControl | str = SandboxControl.UNSPECIFIED,
                      image_pull_credentials: Any = None, image_overrides: Mapping[str, str] | None = None,
                      default_resources: Any = None, defaults: Any = None, request_id: str | None = None,
                      **options: Any) -> Self:
        """Start a pod from a compose-style file (a path, or the file's bytes; see ``sandpool._compose``):
        one container per service, ``primary_service`` the primary. Other keyword arguments are
        sandbox options (tags, network, isolation, ...). ValueError naming the file, service and key
        for a bad file; NotSupportedLocallyError for ``control=CONTAINER_ENGINE``."""
        if SandboxControl(control) is SandboxControl.CONTAINER_ENGINE:
            raise NotSupportedLocallyError("control=CONTAINER_ENGINE (Docker Compose in a container) is not "
                                           "supported locally; leave control out", feature="run_from_file")
        if SandboxFileType(file_type) not in (SandboxFileType.COMPOSE, SandboxFileType.UNSPECIFIED):
            raise ValueError(f"file_type={file_type!r}: only 'compose' files are read")
        if not primary_service:
            raise ValueError("primary_service is required: name the service that owns the sandbox's lifecycle "
                             "(the default target of exec, files and logs)")
        clash = sorted(set(options) & {*_pods.EXCLUSIVE, "containers"})
        if clash:
            raise TypeError(f"run_from_file() takes no {clash[0]}=; the file's services set the containers")
        data, source = _compose.read(contents)
        doc = _compose.parse(data, source)
        if isinstance(default_resources, Mapping) or default_resources is None:
            resources = default_resources
        else:
            resources = {f.name: getattr(default_resources, f.name) for f in dataclasses.fields(default_resources)}
        rows = _compose.containers(doc, source, primary_service, image_overrides, resources)
        return cls.run(containers=rows, defaults=defaults, **options)


async def _stop_quietly(member: SandboxParts, grace: float) -> None:
    try:
        await member.stop(graceful_shutdown_seconds=grace)
    except Exception:  # it failed to start, or ended: either way it is not running
        pass

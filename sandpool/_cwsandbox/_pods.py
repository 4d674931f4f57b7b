"""The containers of a sandbox the cwsandbox service runs: its options, which one a data-plane call
names, and their logs. A spec with several containers runs as a sandpool pod (``sandpool._pods``;
``sandbox_options``);
``ExecRequest.container`` and the file and log calls' ``container`` pick one of its containers;
each further container's main log is kept as the primary's is (``ContainerLogs``)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any, BinaryIO

import grpc
import trio

from . import _spec
from ._errors import RpcFailure, invalid
from ._logs import MainLog
from ._proto import pb
from ._spec import PRIMARY_CONTAINER, primary


#: The options ``_spec.sandbox_options`` takes from one container: a pod has them per container.
_CONTAINER_OPTIONS = ("container_image", "command", "args", "environment_variables", "working_dir", "resources")


def sandbox_options(spec: Any, isolation: str = "auto") -> dict[str, Any]:
    """``_spec.sandbox_options``, and for a spec with several containers sandpool's ``containers=``
    (a pod) in place of the primary's container options: each container's, mapped as a lone
    container's would be, its files included (the primary's are written as a sandbox's). RpcFailure
    INVALID_ARGUMENT for a further container with volume mounts (a pod's volumes are its primary's)."""
    options = _spec.sandbox_options(spec, isolation)
    first = primary(spec)
    if len(spec.containers) <= 1:
        return options
    rows = []
    for row in spec.containers:
        if row is first:
            fields = {k: options.pop(k) for k in _CONTAINER_OPTIONS if k in options}
        else:
            if row.volume_mounts:
                raise invalid("sandbox.spec.containers.volume_mounts", f"container {row.name!r} mounts volumes; "
                              f"a pod's volumes are mounted in its primary container only")
            alone = _spec.sandbox_options(pb.SandboxSpec(containers=[row]), isolation)
            fields = {k: alone[k] for k in _CONTAINER_OPTIONS if k in alone}
            if row.files:
                fields["mounted_files"] = {f.path: bytes(f.content) for f in row.files}
        fields["image"] = fields.pop("container_image")
        rows.append({"name": row.name, "primary": row is first, **fields})
    options["containers"] = rows
    return options


def names(spec: Any) -> list[str]:
    """The containers' names, the primary's first ("main" when it has none)."""
    first: Any = primary(spec)
    if first is None:
        return [PRIMARY_CONTAINER]
    return [first.name or PRIMARY_CONTAINER] + [c.name for c in spec.containers if c is not first]


def container(spec: Any, name: str) -> str | None:
    """The sandpool ``container=`` for the container ``name`` asks for (None: the primary);
    RpcFailure INVALID_ARGUMENT, naming the containers, for a name the sandbox lacks."""
    known = names(spec)
    if name in ("", PRIMARY_CONTAINER, known[0]):
        return None
    if name not in known[1:]:
        raise invalid("container", f"container {name!r} does not exist; this sandbox's containers are "
                                   f"{', '.join(map(repr, known))} ('' means the primary)")
    return name


class InContainer:
    """A sandbox as one of its containers, for the data-plane helpers (``_exec``, ``_files``): their
    ``exec``, ``read_file`` and ``write_file`` calls go to that container."""

    def __init__(self, sandbox: Any, name: str | None) -> None:
        self.sandbox, self.name = sandbox, name

    @property
    def isolation(self) -> str | None:
        isolation: str | None = self.sandbox.isolation
        return isolation

    def exec(self, command: Any, **options: Any) -> Any:
        return self.sandbox.exec(command, container=self.name, **options)

    def read_file(self, path: str, **options: Any) -> Any:
        return self.sandbox.read_file(path, container=self.name, **options)

    def write_file(self, path: str, content: bytes, **options: Any) -> Any:
        return self.sandbox.write_file(path, content, container=self.name, **options)


@dataclasses.dataclass(eq=False)
class ContainerLog:
    """A further container's main log, as ``_logs.stream_logs`` reads an Entry's: ``log`` and ``ended``."""

    log: MainLog
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)

    def end(self) -> None:
        self.log.close()
        self.ended.set()


class ContainerLogs:
    """The main logs of the pods' further containers, opened as each pod starts (so the output of a
    command that ends at once is kept, as the primary's is) and closed as each container ends.
    ``open_log(sandbox_id)``: as the backend's, for a runtime that keeps no log here. Kept while
    their pod's Entry is (weakly keyed: a retired entry takes its containers' logs with it)."""

    def __init__(self, open_log: Callable[[str], BinaryIO | None] | None) -> None:
        self._open_log = open_log
        self._logs: weakref.WeakKeyDictionary[Any, dict[str, ContainerLog]] = weakref.WeakKeyDictionary()

    def open(self, entry: Any) -> None:
        """``entry``'s pod runs (its further containers too): open their logs."""
        logs = {}
        for name in names(entry.spec)[1:]:
            member = entry.sandbox.container_sandbox(name)
            file = member.link.open_main_log()
            if file is None and self._open_log is not None:
                file = self._open_log(member.sandbox_id)
            log = logs[name] = ContainerLog(MainLog(file))
            member.wait_until_complete().add_done_callback(lambda _ref, log=log: log.end())
        if logs:
            self._logs[entry] = logs

    def of(self, entry: Any, name: str) -> Any:
        """What StreamLogs reads for container ``name`` of ``entry``: the entry itself for the primary.
        RpcFailure INVALID_ARGUMENT for a container the sandbox lacks, FAILED_PRECONDITION for one
        whose pod did not start."""
        member = container(entry.spec, name)
        if member is None:
            return entry
        found = self._logs.get(entry, {}).get(member)
        if found is None:
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f"container {member!r} of sandbox "
                             f"{entry.sandbox_id} never ran (its pod did not start): it has no log")
        return found

    def close(self) -> None:
        """Close every log still open (the backend is ending)."""
        for logs in list(self._logs.values()):
            for log in logs.values():
                log.log.close()

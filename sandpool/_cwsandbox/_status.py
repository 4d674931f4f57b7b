"""sandpool's sandbox state as cwsandbox's ``Sandbox`` resource (spec echo plus status).

The state is sandpool's own lifecycle: CREATING while the sandbox starts, RUNNING, TERMINATING while
it stops, then COMPLETED (main command exited 0), FAILED (it exited non-zero, or the sandbox could
not start or died; ``state_reason`` says which) or TERMINATED (stopped). The exit code is set in
every terminal state, so the client's completion polling never waits for a late one.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from .._status import SandboxStatus
from ._proto import Message, pb, timestamp
from ._netspec import service_statuses
from ._spec import PRIMARY_CONTAINER, primary

if TYPE_CHECKING:
    from ._registry import Entry

RUNNER_GROUP_ID = "sandpool-local"
RUNNER_ID = f"sandpool@{socket.gethostname()}"

_STATES = {status: pb.State.Value(f"STATE_{status.name}") for status in SandboxStatus}


def state(status: SandboxStatus | None) -> int:
    """The proto State of a sandpool status (None, not started yet, is CREATING)."""
    number: int = _STATES[status or SandboxStatus.CREATING]
    return number


def status_of(status: str | int) -> SandboxStatus:
    """The sandpool status of a proto State number."""
    name = pb.State.Name(status) if isinstance(status, int) else status
    return SandboxStatus[name.removeprefix("STATE_")]


def sandbox_message(entry: Entry) -> Message:
    """The ``Sandbox`` resource of a backend entry: the request's spec as given, and the live status."""
    sandbox = entry.sandbox
    current = entry.status
    status = pb.SandboxStatus(state=state(current), state_reason=entry.reason,
                              runner_id=RUNNER_ID, runner_group_id=RUNNER_GROUP_ID)
    for field, seconds in (("create_time", entry.created_at), ("start_time", sandbox.started_at),
                           ("end_time", entry.ended_at)):
        if seconds is not None:
            getattr(status, field).CopyFrom(timestamp(seconds))
    if current.is_terminal:
        status.exit_code = sandbox.returncode if sandbox.returncode is not None else -1
    if entry.spec.max_lifetime_seconds > 0:
        status.effective_max_lifetime_seconds = entry.spec.max_lifetime_seconds
    container = primary(entry.spec)
    if container is not None and container.HasField("resource_requirements"):
        status.effective_resource_requirements.CopyFrom(container.resource_requirements)
    elif container is not None and container.HasField("resources"):
        status.effective_resources.CopyFrom(container.resources)
    status.services.extend(service_statuses(entry.spec, sandbox))  # _netspec
    if entry.spec.HasField("network"):  # the rules apply as given (or the create failed)
        status.effective_egress.extend(entry.spec.network.egress)
        status.effective_ingress.extend(entry.spec.network.ingress)
    row = status.container_statuses.add(name=(container.name if container else "") or PRIMARY_CONTAINER,
                                        state=status.state)
    if current.is_terminal:
        row.exit_code = status.exit_code
    for member in sandbox.container_statuses[1:]:  # a pod's further containers (sandpool._pods)
        other = status.container_statuses.add(name=member.name, state=state(member.state))
        if member.exit_code is not None:
            other.exit_code = member.exit_code
    return pb.Sandbox(sandbox_id=entry.sandbox_id, spec=entry.spec, status=status)

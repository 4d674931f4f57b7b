"""The sandboxes a cwsandbox server knows, and the decisions over them (plain sync code).

Lookups by id and by create ``request_id`` (idempotency), ListSandboxes' filters and paging, and how
long ended sandboxes stay listed. The trio side (``_backend``) creates and stops; this module only
decides.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc
import trio

from .._status import SandboxStatus
from ._errors import REQUEST_ID_CONFLICT, RpcFailure, invalid, not_found
from ._proto import pb
from ._status import RUNNER_ID, status_of

if TYPE_CHECKING:
    from .._session.sandbox import Sandbox

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: Ended sandboxes stay visible (GetSandbox, ListSandboxes with show_terminated) this long, and at
#: most this many of them, as in the cloud where terminal state outlives the sandbox.
KEEP_ENDED_SECONDS = 3600.0
KEEP_ENDED_COUNT = 1000


@dataclasses.dataclass(eq=False)
class Entry:
    """One sandbox created through the cwsandbox service."""

    sandbox: Sandbox
    spec: object  # the request's pb.SandboxSpec, echoed back unchanged
    request_id: str
    fingerprint: bytes  # the serialized spec, to tell a retried create from a conflicting one
    created_at: float = dataclasses.field(default_factory=time.time)
    ended_at: float | None = None
    log: object | None = None  # its _logs.MainLog once started
    identified: trio.Event = dataclasses.field(default_factory=trio.Event)  # sandbox_id known (or failure)
    started: trio.Event = dataclasses.field(default_factory=trio.Event)  # running and prepared, or failed
    ended: trio.Event = dataclasses.field(default_factory=trio.Event)
    failure: RpcFailure | None = None  # why the create failed before the sandbox had an id
    preparing: bool = False  # running, but its create-time files are still being written
    failure_reason: str | None = None  # set when preparing failed: the sandbox is then FAILED

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.sandbox_id

    @property
    def status(self) -> SandboxStatus:
        """sandpool's status, except while preparing (CREATING) and after a failed preparation: CREATING
        until the sandbox has ended, then FAILED, as a container that never came up."""
        status = self.sandbox.status or SandboxStatus.CREATING
        if self.failure_reason is not None:
            return SandboxStatus.FAILED if status.is_terminal else SandboxStatus.CREATING
        if self.preparing and status == SandboxStatus.RUNNING:
            return SandboxStatus.CREATING
        return status

    @property
    def reason(self) -> str:
        return self.failure_reason or self.sandbox.status_reason or ""


class Registry:
    def __init__(self) -> None:
        self._by_id: dict[str, Entry] = {}
        self._by_request: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        live = sum(1 for e in self._by_id.values() if not e.status.is_terminal)
        return f"<Registry sandboxes={len(self._by_id)} live={live}>"

    def entries(self) -> list[Entry]:
        return list(self._by_id.values())

    def replay(self, request_id: str, fingerprint: bytes) -> Entry | None:
        """The entry an earlier create with this request_id made, or None; RpcFailure if the spec differs."""
        entry = self._by_request.get(request_id) if request_id else None
        if entry is not None and entry.fingerprint != fingerprint:
            raise RpcFailure(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} was already used for "
                             f"sandbox {entry.sandbox_id} with a different spec; use a new request_id",
                             REQUEST_ID_CONFLICT, {"sandbox_id": entry.sandbox_id or ""})
        return entry

    def reserve(self, entry: Entry) -> None:
        """Record a create in flight under its request_id (before its sandbox has an id)."""
        if entry.request_id:
            self._by_request[entry.request_id] = entry

    def add(self, entry: Entry) -> None:
        self._by_id[entry.sandbox_id] = entry

    def drop(self, entry: Entry) -> None:
        if self._by_request.get(entry.request_id) is entry:
            del self._by_request[entry.request_id]
        if entry.sandbox_id is not None and self._by_id.get(entry.sandbox_id) is entry:
            del self._by_id[entry.sandbox_id]

    def get(self, sandbox_id: str) -> Entry:
        """The entry of ``sandbox_id``; RpcFailure NOT_FOUND if there is none."""
        entry = self._by_id.get(sandbox_id)
        if entry is None:
            raise not_found(sandbox_id)
        return entry

    def expired(self, now: float) -> list[Entry]:
        """Ended entries to forget: older than KEEP_ENDED_SECONDS, or beyond the newest KEEP_ENDED_COUNT."""
        ended = sorted((e for e in self._by_id.values() if e.ended_at is not None), key=lambda e: e.ended_at)
        surplus = max(0, len(ended) - KEEP_ENDED_COUNT)
        return [e for i, e in enumerate(ended) if i < surplus or now - e.ended_at > KEEP_ENDED_SECONDS]

    def select(self, request) -> tuple[list[Entry], str]:
        """The page of entries a ListSandboxesRequest asks for, and the next page token ('' at the end)."""
        wanted = status_of(request.state) if request.state else None
        matches = [e for e in self._by_id.values() if _matches(e, request, wanted)]
        newest_first = request.sort_direction != pb.SortDirection.Value("SORT_DIRECTION_ASCENDING")
        matches.sort(key=_order, reverse=newest_first)
        if request.page_token:
            cursor = _cursor(request.page_token)
            matches = [e for e in matches if (_order(e) < cursor if newest_first else _order(e) > cursor)]
        size = request.page_size if request.page_size > 0 else DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise invalid("page_size", f"page_size must be at most {MAX_PAGE_SIZE}, got {request.page_size}")
        page = matches[:size]
        more = len(matches) > size
        return page, (_token(page[-1]) if more else "")

    def matching_tags(self, tags: Iterable[str]) -> list[Entry]:
        """Entries carrying every tag in ``tags`` (all entries for no tags)."""
        wanted = set(tags)
        return [e for e in self._by_id.values() if wanted <= set(e.spec.tags)]


def _matches(entry: Entry, request, wanted: SandboxStatus | None) -> bool:
    status = entry.status
    if wanted is not None:
        if status != wanted:
            return False
    elif status.is_terminal and not request.show_terminated:
        return False
    if not set(request.tags) <= set(entry.spec.tags):
        return False
    if request.runner_ids and RUNNER_ID not in request.runner_ids:
        return False
    return not request.volume_ids  # local sandboxes have no registered volumes


def _order(entry: Entry) -> tuple[int, str]:
    return int(entry.created_at * 1e9), entry.sandbox_id


def _token(entry: Entry) -> str:
    created, sandbox_id = _order(entry)
    return f"{created}/{sandbox_id}"


def _cursor(token: str) -> tuple[int, str]:
    created, _, sandbox_id = token.partition("/")
    if not created.isdigit() or not sandbox_id:
        raise invalid("page_token", f"page_token {token!r} is not one this server issued; omit it to "
                                    f"start from the first page")
    return int(created), sandbox_id

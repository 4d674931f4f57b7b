"""The connection straight to an actor sandbox's call worker (local sandboxes), as remote
functions have: the agent forks a worker listening in the sandbox's /tmp (a ``worker`` frame),
and calls and answers skip the agent's relay. Cancels still go to the agent, which signals the
worker. When the worker ends, its connection closes and the agent tells how (``exit``): the
actor's instance went with it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from . import bulk as _bulk
from .direct import DirectChannel, WorkerRequest
from .._errors import ProtocolError, SandboxError

if TYPE_CHECKING:
    from .._session.sandbox import Sandbox

#: How long to wait for the agent to start the worker, and for its account of the worker's end.
START_SECONDS = 5.0
EXIT_SECONDS = 3.0


async def connect(sandbox: Sandbox, nursery: trio.Nursery, on_answers: Callable[[list[dict[str, Any]]], None],
                  on_end: Callable[[dict[str, Any]], None]) -> DirectChannel | None:
    """Start a direct worker in ``sandbox`` and connect to it; None when that cannot be done
    (a remote runtime, or any failure): calls then go through the agent. A task of ``nursery``
    reads the answers into ``on_answers``, and calls ``on_end(exit_frame)`` once the worker ended."""
    link = sandbox.link
    directory = _bulk.host_dir(link.record())
    if directory is None:
        return None
    name = f".sandpool-actor-{secrets.token_hex(6)}"
    request = WorkerRequest()
    req_id = link.register(request)
    try:
        await link.send({"t": "worker", "id": req_id, "listen": f"{_bulk.SANDBOX_DIR}/{name}"})
        with trio.move_on_after(START_SECONDS):
            await request.started.wait()
        if not request.ok:
            raise SandboxError(f"the agent did not start a direct worker: {request.exit.get('message')}")
        channel = await DirectChannel.connect(directory, name)
    except (OSError, SandboxError):
        if request.ok:  # started but unreachable: stop it, the agent relays calls instead
            try:
                await link.send({"t": "cancel", "id": req_id})
            except SandboxError:
                pass
            with trio.move_on_after(EXIT_SECONDS):
                await request.exited.wait()
        link.unregister(req_id)
        return None
    request.on_end = channel.unpark  # a parked reader must see the worker's end (its EOF) at once
    nursery.start_soon(_read, sandbox, channel, request, req_id, on_answers, on_end)
    return channel


async def _read(sandbox: Sandbox, channel: DirectChannel, request: WorkerRequest, req_id: int,
                on_answers: Callable[[list[dict[str, Any]]], None], on_end: Callable[[dict[str, Any]], None]) -> None:
    try:
        while True:
            batch = await channel.receive_batch()
            if batch is None:
                break
            on_answers(batch)
    except ProtocolError:  # the worker is not to be trusted further: the actor ends with it
        pass
    finally:
        channel.close()
    with trio.move_on_after(EXIT_SECONDS):
        await request.exited.wait()
    sandbox.link.unregister(req_id)
    on_end(request.exit)

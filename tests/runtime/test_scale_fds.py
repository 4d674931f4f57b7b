"""Descriptors above 1,024 (a template serving ~1,000 sandboxes has them): nothing in the runtime
may wait with select(), whose fd_set stops at 1,024 (it raised "filedescriptor out of range in
select()" in the template at 1,000 sandboxes), and the client raises its own soft fd limit."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import traceback

import cloudpickle
import pytest

from _sandpool_agent import wire as _wire
from _sandpool_agent import plain as _plain

HIGH = 1500  # above FD_SETSIZE (1,024)


@pytest.fixture
def high_fds():
    """``high(sock)``: the same socket moved to a descriptor above 1,024 (the old one closed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= HIGH + 10:
        pytest.skip(f"the hard fd limit is too low for descriptors above {HIGH}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    made: list[socket.socket] = []

    def high(sock: socket.socket) -> socket.socket:
        fd = HIGH + len(made)
        os.dup2(sock.fileno(), fd, inheritable=False)
        sock.close()
        made.append(socket.socket(fileno=fd))
        return made[-1]

    yield high
    for sock in made:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def double(x):
    return 2 * x


def _call(call_id, x):
    return _wire.encode({"t": "call", "id": call_id, "fn_key": b"double", "fn": cloudpickle.dumps(double),
                         "args": cloudpickle.dumps(((x,), {}))})


def test_a_direct_call_worker_serves_on_descriptors_above_1024(high_fds):
    """The call worker (a forked process, as in a sandbox) waits on both its sockets at once: with
    both above 1,024 it answers every call, then ends at the client's EOF."""
    from _sandpool_agent.worker import Worker

    client, client_theirs = socket.socketpair()
    agent, agent_theirs = socket.socketpair()
    client_theirs, agent_theirs = high_fds(client_theirs), high_fds(agent_theirs)
    assert min(client_theirs.fileno(), agent_theirs.fileno()) > 1024
    client.sendall(_call(1, 20) + _call(2, 21))
    client.shutdown(socket.SHUT_WR)  # the worker returns at this EOF, once both are answered
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            Worker(agent_theirs, cloudpickle, "/", client_theirs).run()
            code = 0
        except BaseException:
            traceback.print_exc()  # (select() raised "filedescriptor out of range" here)
        finally:
            os._exit(code)
    client_theirs.close()
    try:
        answers, buf = [], _wire.FrameBuffer()
        while data := client.recv(1 << 16):
            answers += buf.feed(data)
    except ConnectionResetError:  # the worker died with answers unread: its exit code says so below
        pass
    finally:
        client.close()
        agent.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [(a["t"], a["id"], a["data"]) for a in answers] == [("result", 1, _plain.encode(40)),
                                                               ("result", 2, _plain.encode(42))]


def test_the_template_notices_a_spare_ready_or_gone_on_a_descriptor_above_1024(high_fds):
    """The template checks its spares' sockets without blocking: a "ready" byte marks one ready,
    a socket with nothing to read leaves it as it is, and EOF (the spare died) drops it."""
    from _sandpool_agent.confine.supervisor import Supervisor, _Spare

    spare, ours = socket.socketpair()
    ours = high_fds(ours)
    supervisor = Supervisor()
    supervisor.spares[4242] = _Spare("none", ours, None, None)
    supervisor._poll_spares()  # nothing to read: returns at once, the spare stays
    assert 4242 in supervisor.spares and 4242 not in supervisor.ready
    spare.send(b"r")
    supervisor._poll_spares()
    assert 4242 in supervisor.ready
    spare.close()
    supervisor._poll_spares()
    assert 4242 not in supervisor.spares and 4242 not in supervisor.ready


CLIENT = """
import os, resource, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the usual soft limit
import sandpool
from sandpool import Session

def square(x):
    return x * x

with Session() as session:
    first = session.sandbox()
    assert first.exec(["true"]).result().returncode == 0  # the runtime is open: the limit raised
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1200)]  # the client's fds go past 1,024
    assert max(held) > 1024, max(held)
    more = [session.sandbox() for _ in range(3)]
    refs = [sandbox.exec(["sh", "-c", "ulimit -Sn"]) for sandbox in [first, *more]]
    limits = {ref.result().stdout.strip() for ref in refs}
    fn = session.function()(square)
    print(sorted(limits), fn.remote(7).result(), resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)
"""


def test_a_client_past_1024_descriptors_starts_sandboxes_that_keep_the_usual_soft_limit():
    """A client started with the usual soft limit of 1,024 holds more descriptors than that once a
    runtime is open (so it can keep ~1,000 sandboxes), starts sandboxes and calls functions with
    descriptors above 1,024, and the code in its sandboxes sees the soft limit of 1,024 it had."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 2048:
        pytest.skip("the hard fd limit is below 2,048")
    done = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "['1024'] 49 True", done.stdout

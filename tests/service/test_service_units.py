"""The service's plain parts, without a server: thread pipes, the orphan rule, the journal, the bind
and token rules, message encoding, the one place gRPC errors are translated, the isolation floor,
request bounds, frame checks and listener records."""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import pytest
import trio

import sandpool
from sandpool import ResourceOptions, SandboxSpec
from sandpool._core.lifecycle import Lifecycle, advance
from sandpool._runtime.contract import SandboxRecord
from sandpool._runtime.remote import parse_address, translate
from sandpool._grpc import threadpipe as _threadpipe
from sandpool._grpc.threadpipe import PipeStream, ThreadPipe
from sandpool._errors import ProtocolError
from sandpool._grpc import limits
from sandpool._service import auth
from sandpool._grpc import endpoint, frames
from sandpool._grpc import messages as m
from sandpool._service.control import Hosted, decide_orphans
from sandpool._service.journal import RESTART_REASON, Journal
from sandpool._service.policy import Policy, Refused

# -- thread pipes --------------------------------------------------------------------------------


def test_thread_to_trio_keeps_order_and_batches_what_is_queued():
    """Chunks a thread puts arrive in order; a reader takes everything queued at once (one message)."""
    async def main():
        pipe = ThreadPipe(message_bytes=1000)

        def produce():
            for i in range(100):
                pipe.put_blocking(b"%03d," % i)
            pipe.close()

        await trio.to_thread.run_sync(produce)
        received = []
        while data := await pipe.receive():
            received.append(data)
        assert b"".join(received) == b"".join(b"%03d," % i for i in range(100))
        assert len(received) == 1  # 400 bytes queued, one message of up to 1000
    trio.run(main)


def test_trio_to_thread_is_bounded_and_split_into_messages():
    """A trio writer waits while the pipe is full; a thread reader takes at most one message each."""
    async def main():
        pipe = ThreadPipe(limit=10, message_bytes=4)
        got = []
        reader = threading.Thread(target=lambda: got.extend(pipe.drain_iter()))
        for i in range(5):
            await pipe.send(b"abcdef")  # after the first, waits until the thread makes room
            if i == 0:
                reader.start()
        pipe.close()
        await trio.to_thread.run_sync(reader.join)
        assert b"".join(got) == b"abcdef" * 5 and max(map(len, got)) <= 4
    trio.run(main)


def test_closing_with_an_error_breaks_the_trio_side_after_the_data():
    """close(error): the reader first gets what was queued, then BrokenResourceError from the error."""
    async def main():
        pipe = ThreadPipe()
        pipe.put_blocking(b"last words")
        pipe.close(ConnectionError("server gone"))
        assert await pipe.receive() == b"last words"
        with pytest.raises(trio.BrokenResourceError, match="server gone"):
            await pipe.receive()
        with pytest.raises(trio.BrokenResourceError):
            await pipe.send(b"x")
        assert pipe.put_blocking(b"x") is False
    trio.run(main)


def test_pipe_stream_is_a_trio_stream_and_aclose_closes_both_ways():
    """PipeStream carries bytes out and in, and aclose() closes both pipes and calls on_close once."""
    async def main():
        inbound, outbound = ThreadPipe(), ThreadPipe()
        closed = []
        stream = PipeStream(inbound, outbound, on_close=lambda: closed.append(1))
        await stream.send_all(b"out")
        assert outbound.get_blocking() == b"out"
        inbound.put_blocking(b"in")
        assert await stream.receive_some(10) == b"in"
        await stream.aclose()
        await stream.aclose()
        assert inbound.closed and outbound.closed and closed == [1]
        assert outbound.get_blocking() is None
    trio.run(main)


# -- the orphan rule -----------------------------------------------------------------------------


def _hosted(owner: str | None, phase: str = "running") -> Hosted:
    state = advance(advance(Lifecycle(), "start"), "running")
    if phase == "terminal":
        state = advance(state, "gone", code=0, signal=None)
    return Hosted(SandboxRecord(sandbox_id=f"sb-{owner}", spec=SandboxSpec(), isolation="process"), owner, state)


def test_orphan_clock_starts_when_nobody_holds_and_expires_after_the_grace():
    """Held by a live lease: never orphaned. Lease gone: the clock starts, and after the grace it
    expires; a terminal sandbox is ignored; holding again resets the clock."""
    held, orphan, ended = _hosted("a"), _hosted("b"), _hosted("c", "terminal")
    group = [held, orphan, ended]
    assert decide_orphans(group, {"a"}, now=100.0, grace=5.0) == []
    assert held.orphaned_since is None and orphan.orphaned_since == 100.0 and ended.orphaned_since is None
    assert decide_orphans(group, {"a"}, now=104.9, grace=5.0) == []
    assert decide_orphans(group, {"a"}, now=105.0, grace=5.0) == [orphan]
    assert decide_orphans(group, {"a", "b"}, now=106.0, grace=5.0) == [] and orphan.orphaned_since is None


# -- the journal ---------------------------------------------------------------------------------


def test_journal_settles_what_an_earlier_run_left_running_and_compacts(tmp_path):
    """Reopening: unfinished sandboxes become TERMINATED with the restart reason; ended ones keep
    theirs; a torn line is skipped; deleted ones vanish; only the newest ``keep`` remain."""
    path = tmp_path / "record.jsonl"
    lines = [
        {"sandbox_id": "sb-old", "status": "running", "tags": ["x"], "created_at": 1},
        {"sandbox_id": "sb-done", "status": "running", "created_at": 2},
        {"sandbox_id": "sb-done", "status": "completed", "status_reason": "the main command exited"},
        {"sandbox_id": "sb-gone", "status": "running", "created_at": 3},
        {"sandbox_id": "sb-gone", "deleted": True, "status": "terminated"},
        {"sandbox_id": "sb-new", "status": "creating", "created_at": 4},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"sandbox_id": "sb-torn", "sta')
    journal = Journal(str(path), keep=3)
    assert sorted(journal.open()) == ["sb-new", "sb-old"]
    assert journal.history["sb-old"]["status"] == "terminated"
    assert journal.history["sb-old"]["status_reason"] == RESTART_REASON and journal.history["sb-old"]["tags"] == ["x"]
    assert journal.history["sb-done"]["status"] == "completed"
    assert set(journal.history) == {"sb-old", "sb-done", "sb-new"}
    journal.write({"sandbox_id": "sb-4", "status": "running", "created_at": 5})
    journal.close()
    again = Journal(str(path), keep=3)
    again.open()
    again.close()
    assert set(again.history) == {"sb-done", "sb-new", "sb-4"}  # compacted to the newest three


# -- bind and token rules ------------------------------------------------------------------------


@pytest.mark.parametrize("listen, loopback", [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:7", True), ("unix:/tmp/s.sock", True),
    ("0.0.0.0:50051", False), ("[::]:1", False), ("10.1.2.3:1", False), ("myhost:1", False),
])
def test_loopback_detection(listen, loopback):
    """Unix sockets, localhost and loopback IPs are local; wildcards, other IPs and names are not."""
    assert auth.is_loopback(listen) is loopback


def test_bind_rule_and_token_file_errors_name_the_fix(tmp_path):
    """A non-loopback address without a token, a bad --listen and an empty token file are refused."""
    with pytest.raises(ValueError, match="--token-file"):
        auth.check_bind("0.0.0.0:1", None)
    auth.check_bind("0.0.0.0:1", "t")
    auth.check_bind("127.0.0.1:1", None)
    with pytest.raises(ValueError, match="HOST:PORT"):
        auth.split_listen("nonsense")
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        auth.read_token(str(empty))


# -- messages and errors -------------------------------------------------------------------------


def test_spec_round_trips_through_msgpack():
    """Every option survives spec -> dict -> msgpack -> spec; a network option that cannot travel is refused."""
    spec = sandpool.SandboxSpec(command="sleep", args=("5",), tags=("a", "b"), environment_variables={"K": "v"},
                                resources=ResourceOptions(limits={"memory": "256Mi"}), working_dir="/w",
                                max_lifetime_seconds=30, network={"egress": ["x"]})
    assert m.spec_from_dict(m.unpack(m.pack({"s": m.spec_to_dict(spec)}))["s"]) == spec
    with pytest.raises(TypeError, match="cannot be sent"):
        m.spec_to_dict(sandpool.SandboxSpec(network=object()))
    with pytest.raises(sandpool.ProtocolError, match="undecodable reply"):
        m.unpack(b"\xc1", "reply")
    with pytest.raises(TypeError, match="'lease' must be"):
        m.field({"lease": 3}, "lease", str)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailer=()):
        self._code, self._details, self._trailer = code, details, trailer

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailer


@pytest.mark.parametrize("code, trailer, expected", [
    (grpc.StatusCode.NOT_FOUND, ((m.META_ERROR, "SandboxNotFoundError"),), sandpool.SandboxNotFoundError),
    (grpc.StatusCode.INVALID_ARGUMENT, ((m.META_ERROR, "ValueError"),), ValueError),
    (grpc.StatusCode.FAILED_PRECONDITION, ((m.META_ERROR, "SandboxNotRunningError"),),
     sandpool.SandboxNotRunningError),
    (grpc.StatusCode.UNAUTHENTICATED, (), sandpool.CWSandboxAuthenticationError),
    (grpc.StatusCode.UNAVAILABLE, (), sandpool.SandboxUnavailableError),
    (grpc.StatusCode.CANCELLED, (), sandpool.SandboxUnavailableError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, (), sandpool.SandboxResourceExhaustedError),
    (grpc.StatusCode.INVALID_ARGUMENT, (), sandpool.ProtocolError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, (), sandpool.SandboxTimeoutError),
    (grpc.StatusCode.INTERNAL, ((m.META_ERROR, "os.system"),), sandpool.SandboxUnavailableError),
])
def test_translate_maps_each_status_once(code, trailer, expected):
    """The server's error name wins when it is a sandpool error, ValueError or TypeError; otherwise
    the status code decides; nothing else from the trailer is trusted."""
    error = translate(_FakeRpcError(code, "details here", trailer), "host:1", "sb-1")
    assert type(error) is expected and "details here" in str(error)


def test_parse_address():
    """tls:// selects TLS; host:port and unix: paths are plaintext; an empty address is refused."""
    assert parse_address("tls://h:1") == ("h:1", True)
    assert parse_address("h:1") == ("h:1", False)
    assert parse_address("unix:/tmp/s") == ("unix:/tmp/s", False)
    with pytest.raises(ValueError, match="host:port"):
        parse_address("")


def test_unreachable_server_fails_fast_with_unavailable():
    """A session for an address where nothing listens fails at open, in well under a few seconds."""
    started = time.monotonic()
    with pytest.raises(sandpool.SandboxUnavailableError, match="127.0.0.1:9"):
        with sandpool.Session(address="127.0.0.1:9"):
            pass
    assert time.monotonic() - started < 5


class _PacedClock:
    """A stand-in for the ``time`` module in ``_threadpipe``: virtual monotonic seconds, and a
    ``sleep`` that records the pause and holds the taking thread until the test opens the gate."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []
        self.sleeping, self.gate = threading.Event(), threading.Event()

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.sleeping.set()
        assert self.gate.wait(30)
        self.now += seconds


def test_pacing_batches_a_busy_stream_but_not_a_lone_message(monkeypatch):
    """A message after a quiet gap leaves at once; one that follows the last take within the pace
    interval waits out the rest of it, and the writes made meanwhile leave with it as one message
    (virtual time: the decision is tested, not the machine's speed)."""
    clock = _PacedClock()
    monkeypatch.setattr(_threadpipe, "time", clock)

    async def main():
        pipe = ThreadPipe(pace=0.05)
        await pipe.send(b"lone")
        assert await trio.to_thread.run_sync(pipe.get_blocking) == b"lone"
        assert clock.pauses == []  # no wait after a quiet gap
        clock.now += 0.01
        await pipe.send(b"0")
        async with trio.open_nursery() as nursery:
            got = []

            async def take():
                got.append(await trio.to_thread.run_sync(pipe.get_blocking))

            nursery.start_soon(take)  # finds "0" 10 ms after the last take: waits the other 40 ms
            await trio.to_thread.run_sync(clock.sleeping.wait)
            for i in (1, 2):
                await pipe.send(b"%d" % i)
            clock.gate.set()
        assert got == [b"012"] and clock.pauses == [pytest.approx(0.04)]
        clock.now += 0.06
        await pipe.send(b"later")
        assert await trio.to_thread.run_sync(pipe.get_blocking) == b"later"
        assert clock.pauses == [pytest.approx(0.04)]  # a quiet gap again: no new pause
    trio.run(main)


def test_journal_trim_keeps_unfinished_and_the_newest_ended(tmp_path):
    """Past twice ``keep`` entries, trim drops the oldest ended sandboxes (never an unfinished one)
    from memory and from the file."""
    journal = Journal(str(tmp_path / "r.jsonl"), keep=2)
    journal.open()
    journal.write({"sandbox_id": "sb-live", "status": "running", "created_at": 0})
    for i in range(5):
        journal.write({"sandbox_id": f"sb-{i}", "status": "terminated", "created_at": i + 1})
    journal.trim()
    assert set(journal.history) == {"sb-live", "sb-3", "sb-4"}
    journal.close()
    again = Journal(str(tmp_path / "r.jsonl"), keep=2)
    assert again.open() == ["sb-live"]
    again.close()


# -- the authorization floor, request bounds, frame checks, listener records ----------------------


def test_the_default_floor_is_namespaces_for_root_and_process_otherwise():
    """Root's default floor refuses process and host networking; an ordinary user's allows both."""
    assert Policy.default(euid=0) == Policy("namespaces", False)
    assert Policy.default(euid=1000) == Policy("process", True)
    assert Policy.default("process", euid=0) == Policy("process", True)
    assert Policy.default("namespaces", True, euid=0) == Policy("namespaces", True)
    with pytest.raises(ValueError, match="--min-isolation must be one of"):
        Policy("vm")


def test_admit_pins_auto_and_refuses_below_the_floor():
    """'auto' becomes the machine's level if it meets the floor; weaker levels, an 'auto' that means
    a weaker level, and the host's network (unless allowed) are Refused naming the fix."""
    policy = Policy("namespaces", False)
    assert policy.admit(SandboxSpec(), lambda: "namespaces").isolation == "namespaces"
    assert policy.admit(SandboxSpec(isolation="oci"), lambda: "namespaces").isolation == "oci"
    with pytest.raises(Refused, match="isolation='process' is below this server's floor 'namespaces'"):
        policy.admit(SandboxSpec(isolation="process"), lambda: "namespaces")
    with pytest.raises(Refused, match="isolation='auto' means 'process' on this server"):
        policy.admit(SandboxSpec(), lambda: "process")
    with pytest.raises(Refused, match="--allow-host-network"):
        policy.admit(SandboxSpec(network="host"), lambda: "namespaces")
    assert Policy("namespaces", True).admit(SandboxSpec(network="host"), lambda: "namespaces").network == "host"


def test_spec_bounds_name_the_field_and_the_bound():
    """Counts, sizes and NUL bytes of a spec's strings are refused on the plain map."""
    limits.spec_dict({"tags": ["a"], "environment_variables": {"A": "1"}, "command": "echo", "args": ["x"]})
    cases = [
        ({"environment_variables": {f"K{i}": "" for i in range(limits.MAX_ENV_ENTRIES + 1)}},
         "environment_variables has 4097 entries, above the limit of 4096"),
        ({"environment_variables": {"K": "x" * (limits.MAX_STRING_BYTES + 1)}}, "above the 131072-byte limit"),
        ({"command": "sh", "args": ["x" * 100_000] * 2}, "above the 131072-byte limit"),
        ({"tags": ["t"] * 33}, "tags has 33 entries"),
        ({"command": "a\0b"}, "command contains a NUL byte"),
        ({"working_dir": 5}, "working_dir must be a str"),
    ]
    for spec, text in cases:
        with pytest.raises((TypeError, ValueError), match=text.replace("(", r"\(")):
            limits.spec_dict(spec)
    with pytest.raises(ValueError, match="Create request is 2097152 bytes"):
        limits.request_bytes("Create request", 2 << 20)


def test_frame_checks_pass_what_the_client_sends_and_refuse_the_rest():
    """The frames sandpool's own client sends pass; a bad field is a ProtocolError naming it."""
    good = [{"t": "exec", "id": 1, "argv": ["echo", "hi"], "cwd": None, "env": {"A": "1"}, "stdin": False},
            {"t": "stdin", "id": 1, "data": b"x", "eof": True}, {"t": "credit", "id": 1, "n": 10},
            {"t": "signal", "id": 0, "sig": 15}, {"t": "read_file", "id": 2, "path": "/etc/hostname"},
            {"t": "write_file", "id": 3, "path": "x", "data": b""},
            {"t": "call", "id": 4, "fn": b"", "args": b"", "fn_key": b"k", "timeout": 1.5},
            {"t": "cancel", "id": 4, "steal": True}, {"t": "ping", "id": 5}]
    for f in good:
        assert frames.check(f) is f
    with pytest.raises(ProtocolError, match="'exec' frame: exec env name 'A=B' is invalid"):
        frames.check({"t": "exec", "id": 1, "argv": ["true"], "env": {"A=B": ""}})
    with pytest.raises(ProtocolError, match="'stdin' must be bool or absent"):
        frames.check({"t": "exec", "id": 1, "argv": ["true"], "stdin": 1})
    with pytest.raises(ProtocolError, match="clients may not send 'bye'"):
        frames.check({"t": "bye", "id": 0, "reason": None})


def test_a_listener_record_is_held_by_one_server_and_found_only_while_held(tmp_path, monkeypatch):
    """A second acquire fails naming the holder's pid; clients find the record (and a made token)
    only while it is held; release removes it."""
    monkeypatch.setenv(endpoint.ENV_RUN_DIR, str(tmp_path / "run"))
    record = endpoint.ListenerRecord("127.0.0.1:5").acquire()
    record.write(token="t0k")
    assert endpoint.token_for("127.0.0.1:5") == "t0k"
    with open(record.token_path) as f:
        assert f.read().strip() == "t0k"
    assert oct(os.stat(record.path).st_mode & 0o777) == "0o600"
    with pytest.raises(OSError, match=f"another sandpool server \\(pid {os.getpid()}\\) holds the address"):
        endpoint.ListenerRecord("127.0.0.1:5").acquire()
    record.release()
    assert endpoint.find("127.0.0.1:5") is None and not os.path.exists(record.token_path)
    stale = endpoint.ListenerRecord("127.0.0.1:6").acquire()
    stale.write(token="old")
    os.close(stale._fd)  # the server died without releasing: its lock is gone, its file stays
    assert endpoint.token_for("127.0.0.1:6") is None


def test_a_journal_is_one_servers(tmp_path):
    """A second server on the same record file stops naming the first; after close it may open."""
    first = Journal(str(tmp_path / "rec.jsonl"))
    first.open()
    with pytest.raises(OSError, match="holds the record file"):
        Journal(str(tmp_path / "rec.jsonl")).open()
    first.close()
    second = Journal(str(tmp_path / "rec.jsonl"))
    second.open()
    second.close()
    assert Journal(None).open() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another user")
def test_a_run_directory_of_another_user_is_refused(tmp_path):
    """A run directory someone else made (or a symlink) is not trusted."""
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 1, 1)
    with pytest.raises(OSError, match="belongs to uid 1"):
        endpoint.private_dir(str(other))
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(OSError, match="not a directory"):
        endpoint.private_dir(str(tmp_path / "link"))

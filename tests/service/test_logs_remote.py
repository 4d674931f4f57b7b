"""Sandbox.stream_logs through ``sandpool serve``: the server's Logs stream, as locally, bounded,
behind the server's token; and ``sandpool logs`` on top of it."""

import os
import re
import subprocess
import sys

import grpc
import pytest

from sandpool import Sandbox, SandboxNotFoundError, Session
from sandpool._session.logs import MAX_LINE_BYTES
from sandpool._grpc import messages as m

from relay_helpers import Relay
from service_helpers import ServerProcess
from test_sandbox_logs import WAIT_FOR, _finished
from test_sandbox_logs import test_follow_streams_until_the_sandbox_ends_and_since_time_filters as follow_as_locally

TOKEN = "logs-s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve")), token=TOKEN) as srv:
        yield srv


@pytest.fixture
def session(server):
    with Session(address=server.address, token=TOKEN) as s:
        yield s


def _raw_logs(server, request: dict, token: str = TOKEN) -> list[dict]:
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        call = channel.unary_stream(m.path(m.LOGS_METHOD))
        return [m.unpack(message) for message in call(m.pack(request), metadata=((m.META_TOKEN, f"Bearer {token}"),),
                                                       timeout=30)]
    finally:
        channel.close()


def _joined(replies: list[dict]) -> tuple[list[str], int]:
    """The lines of a Logs stream's replies (however the server batched them) and its last offset."""
    return [line for reply in replies for line in reply["lines"]], replies[-1]["offset"]


def test_whole_log_tail_and_timestamps_of_a_finished_sandbox(server, session):
    """The server keeps an ended sandbox's log: all of it, the tail, with timestamps, as locally."""
    sb = _finished(session, "echo one; echo two >&2; for i in $(seq 1 100); do echo line$i; done; printf end")
    lines = list(sb.stream_logs())
    assert lines[:3] == ["one\n", "two\n", "line1\n"] and lines[-1] == "end" and len(lines) == 103
    assert list(sb.stream_logs(tail_lines=2)) == ["line100\n", "end"]
    assert list(sb.stream_logs(tail_lines=0)) == []
    [stamped] = list(sb.stream_logs(tail_lines=1, timestamps=True))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z end", stamped)
    # another client (found by id) reads the same log
    assert list(Sandbox.from_id(sb.sandbox_id, address=server.address, token=TOKEN).result()
                .stream_logs(tail_lines=1)) == ["end"]


def test_follow_sees_new_lines_then_ends_with_the_sandbox_and_since_time_filters(session):
    """follow yields each line as the main command writes it and ends when the sandbox ends; since_time
    filters: the local test, run against the server."""
    follow_as_locally(session)


def test_leaving_a_follow_stream_early_disturbs_nothing(session):
    """A client that stops reading a follow stream ends its call; the sandbox and new streams go on."""
    sb = session.sandbox(command="sh", args=["-c", f"echo a; {WAIT_FOR.format('go')}; echo b"])
    stream = sb.stream_logs(follow=True)
    assert next(stream) == "a\n"
    stream.close()
    assert sb.exec(["echo", "alive"]).result().stdout == "alive\n"
    again = sb.stream_logs(follow=True)
    assert next(again) == "a\n"
    sb.write_file("/go", b"").result()
    assert list(again) == ["b\n"]


def test_a_long_line_comes_in_bounded_pieces_and_messages_stay_bounded(server, session):
    """A line longer than MAX_LINE_BYTES arrives in pieces; no Logs message exceeds its batch bound."""
    size = 2 * MAX_LINE_BYTES + 10
    sb = _finished(session, f"head -c {size} /dev/zero | tr '\\0' a; echo; seq 1 50000")
    pieces = list(sb.stream_logs(tail_lines=50001))
    assert [len(p) for p in pieces[:3]] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 11] and len(pieces) == 50003
    messages = _raw_logs(server, {"sandbox_id": sb.sandbox_id})
    assert len(messages) > 3
    for message in messages:
        assert sum(len(line) for line in message["lines"]) <= m.LOG_BATCH_BYTES + MAX_LINE_BYTES


def test_unauthorized_and_bad_requests_are_refused_and_the_server_goes_on(server, session):
    """A wrong token is refused before anything runs; bad fields are refused naming the field; an
    unknown sandbox is NotFound; the sandbox and its log are unaffected."""
    sb = _finished(session, "echo kept")
    with pytest.raises(grpc.RpcError) as info:
        _raw_logs(server, {"sandbox_id": sb.sandbox_id}, token="wrong")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for request, field in (({"sandbox_id": sb.sandbox_id, "tail_lines": -1}, "tail_lines"),
                           ({"sandbox_id": sb.sandbox_id, "follow": "yes"}, "follow"),
                           ({"sandbox_id": sb.sandbox_id, "since": float("nan")}, "since"),
                           ({"sandbox_id": "x" * 1000}, "sandbox_id"),
                           ({"sandbox_id": sb.sandbox_id, "pad": "x" * (2 << 20)}, "Logs request")):
        with pytest.raises(grpc.RpcError) as info:
            _raw_logs(server, request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
    with pytest.raises(SandboxNotFoundError):
        list(Sandbox.from_id("sb-nope", address=server.address, token=TOKEN).result().stream_logs())
    with pytest.raises(grpc.RpcError) as info:
        _raw_logs(server, {"sandbox_id": "sb-nope"})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert list(sb.stream_logs()) == ["kept\n"]


def test_cli_logs_tail_and_follow(server, session):
    """``sandpool logs SB --tail N`` prints the last lines; ``--follow`` waits for the end."""
    sb = session.sandbox(command="sh", args=["-c", f"seq 1 5; {WAIT_FOR.format('go')}; echo done"])
    sb.wait()
    env = {**os.environ, "SANDPOOL_ADDRESS": server.address}
    cli = [sys.executable, "-m", "sandpool", "logs", sb.sandbox_id, "--token-file", server.token_file]
    follow = subprocess.Popen([*cli, "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert follow.stdout.readline() == "1\n"
        tail = subprocess.run([*cli, "--tail", "2"], capture_output=True, text=True, env=env, timeout=60)
        assert (tail.returncode, tail.stdout) == (0, "4\n5\n"), tail.stderr
        sb.write_file("/go", b"").result()
        follow.wait(timeout=60)
        # through the same buffered reader as readline() above: communicate() reads the raw pipe and
        # would miss lines that readline() already buffered when they arrived in one burst
        out, err = follow.stdout.read(), follow.stderr.read()
        assert follow.returncode == 0 and out == "2\n3\n4\n5\ndone\n", err
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    bad = subprocess.run([*cli, "--tail", "-3"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--tail" in bad.stderr


def test_offsets_let_a_stream_resume_exactly_where_it_broke(server, session):
    """Each Logs reply names the byte offset after its lines; a request from such an offset gets exactly
    the rest (since and tail then do not apply); one past the log's end is refused naming the field."""
    sb = _finished(session, "for i in 1 2 3; do echo line$i; done")
    assert _joined(_raw_logs(server, {"sandbox_id": sb.sandbox_id, "tail_lines": 3})) == (
        ["line1\n", "line2\n", "line3\n"], 18)
    assert _joined(_raw_logs(server, {"sandbox_id": sb.sandbox_id, "offset": 6, "tail_lines": 0})) == (
        ["line2\n", "line3\n"], 18)
    assert _raw_logs(server, {"sandbox_id": sb.sandbox_id, "offset": 18}) == []
    with pytest.raises(grpc.RpcError) as info:
        _raw_logs(server, {"sandbox_id": sb.sandbox_id, "offset": 19})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "offset" in info.value.details()


def test_a_follow_stream_survives_a_cut_connection(server):
    """Every connection of a client cut mid-follow: its stream resumes from its offset over a new one,
    each line arriving once, and ends with the sandbox."""
    relay = Relay(server.address)
    try:
        with Session(address=relay.address, token=TOKEN) as cut_off:
            sb = cut_off.sandbox(command="sh", args=["-c", f"echo one; {WAIT_FOR.format('go')}; echo two; echo three"])
            stream = sb.stream_logs(follow=True)
            assert next(stream) == "one\n"
            accepted = relay.accepted
            relay.cut()
            direct = Sandbox.from_id(sb.sandbox_id, address=server.address, token=TOKEN).result()
            direct.write_file("/go", b"").result()
            assert list(stream) == ["two\n", "three\n"]
            assert relay.accepted > accepted
            direct.wait_until_complete(timeout=30, raise_on_termination=False).result()
    finally:
        relay.close()

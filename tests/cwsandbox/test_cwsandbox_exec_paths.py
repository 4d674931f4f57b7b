"""StreamExec's ways to its sandbox and back give the same answers.

The listener starts a StreamExec's command from the gRPC server thread when the sandbox already runs
(the way every exec of the published client goes), and waits for the sandbox in the loop first when
it is still starting; it answers a command that ends at once from the server thread in one piece,
and forwards a longer one's output live from the loop. Each test runs the same raw StreamExec calls
every way, against a listener in this process (the loop ways forced: the thread way finds no running
sandbox, the quick answer finds no ended command), and compares: output bytes per stream, exit codes,
the order of the frames, stdin with and without a half-close, errors, and a cancelled call killing
its command.
"""

from __future__ import annotations

import contextlib
import queue
import threading

import grpc
import pytest
import trio

from sandpool import Session
from sandpool._cwsandbox import _exec
from sandpool._cwsandbox._backend import CwsandboxBackend
from sandpool._cwsandbox._proto import SERVICE, pb
from sandpool._cwsandbox._server import open_cwsandbox_server
from service_helpers import wait_until

TOKEN = "exec-paths-token"
METADATA = (("authorization", f"Bearer {TOKEN}"),)


@contextlib.contextmanager
def listener():
    """A cwsandbox listener over a local Session, in a trio loop of its own thread; its address."""
    started: queue.Queue = queue.Queue()

    async def serve() -> None:
        with trio.CancelScope() as scope:
            async with Session() as session, open_cwsandbox_server(session, "127.0.0.1:0", token=TOKEN) as address:
                started.put((address, trio.lowlevel.current_trio_token(), scope))
                await trio.sleep_forever()

    def main() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # reported by the test thread
            started.put(exc)

    thread = threading.Thread(target=main, name="cwsandbox-listener")
    thread.start()
    got = started.get(timeout=60)
    if isinstance(got, BaseException):
        thread.join()
        raise got
    address, token, scope = got
    try:
        yield address
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(60)
        assert not thread.is_alive(), "the listener did not stop"


@pytest.fixture
def channel(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDPOOL_IMAGE_FALLBACK", "host")  # the spec names python:3.11; none is pulled here
    monkeypatch.setenv("SANDPOOL_IMAGE_DIR", str(tmp_path / "images"))
    with listener() as address, grpc.insecure_channel(address) as channel:
        yield channel


def _call(channel, method: str, request, response_type):
    rpc = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                              response_deserializer=response_type.FromString)
    return rpc(request, metadata=METADATA, timeout=30)


def _stream(channel, requests):
    rpc = channel.stream_stream(f"/{SERVICE}/StreamExec", request_serializer=pb.ExecStreamRequest.SerializeToString,
                                response_deserializer=pb.ExecStreamResponse.FromString)
    return rpc(requests, metadata=METADATA, timeout=30)


def _init(sandbox_id: str, *command: str):
    return pb.ExecStreamRequest(init=pb.ExecStreamInit(sandbox_id=sandbox_id, command=list(command)))


def _outcome(channel, requests) -> tuple:
    """A StreamExec's answer, reduced to what must not depend on the path: its frames other than
    output in order (an output before ``ready`` or after ``exit`` shows as "misplaced output"), the
    streams that had output (the order of two streams' frames between each other is the scheduler's),
    the bytes per stream, and the exit code or status."""
    kinds: list = []
    data = {pb.ExecStreamOutput.STREAM_STDOUT: b"", pb.ExecStreamOutput.STREAM_STDERR: b""}
    try:
        for response in _stream(channel, iter(requests)):
            kind = response.WhichOneof("message")
            if kind == "output":
                data[response.output.stream] += response.output.data
                if kinds != ["ready"]:
                    kinds.append("misplaced output")
                continue
            kinds.append(kind)
            if kind == "exit":
                kinds.append(response.exit.exit_code)
    except grpc.RpcError as exc:
        kinds.append(exc.code())
    return tuple(kinds), tuple(stream for stream, got in data.items() if got), data


def _cases(sandbox_id: str) -> dict:
    close = pb.ExecStreamRequest(close=pb.ExecStreamClose())
    return {
        "stdin, close, both streams, an exit code": [
            _init(sandbox_id, "sh", "-c", "cat; echo err >&2; exit 3"),
            pb.ExecStreamRequest(stdin=b"abc"), pb.ExecStreamRequest(stdin=b"\x00\xff"), close],
        "no stdin: the half-close is its end": [_init(sandbox_id, "cat")],
        "output in order": [_init(sandbox_id, "sh", "-c", "for i in 1 2 3; do echo $i; done")],
        "more output than one frame": [_init(sandbox_id, "sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x")],
        "a second init": [_init(sandbox_id, "cat"), _init(sandbox_id, "true")],
        "a sandbox that does not exist": [_init("sb-00000000", "true")],
        "no command": [_init(sandbox_id)],
    }


def _every_way(monkeypatch, ask) -> dict:
    """``ask()`` each way: the answers by way."""
    answers = {"thread, answered whole": ask()}
    with monkeypatch.context() as patch:
        patch.setattr(CwsandboxBackend, "target_now", lambda self, sandbox_id, container: None)
        answers["sandbox found in the loop"] = ask()
    with monkeypatch.context() as patch:
        patch.setattr(_exec, "answer_if_ended", lambda proc, seconds: None)
        answers["forwarded live"] = ask()
    return answers


def _sandbox(channel) -> str:
    spec = pb.SandboxSpec(containers=[pb.Container(name="main", image="python:3.11", command="sleep",
                                                   args=["infinity"])])
    return _call(channel, "CreateSandbox", pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=spec)), pb.Sandbox).sandbox_id


def test_every_way_gives_the_same_frames_bytes_exit_codes_and_errors(channel, monkeypatch):
    sandbox_id = _sandbox(channel)
    cases = _cases(sandbox_id)
    answers = _every_way(monkeypatch, lambda: {name: _outcome(channel, requests) for name, requests in cases.items()})
    thread_way = answers["thread, answered whole"]
    assert answers["sandbox found in the loop"] == thread_way and answers["forwarded live"] == thread_way
    out, err = pb.ExecStreamOutput.STREAM_STDOUT, pb.ExecStreamOutput.STREAM_STDERR
    assert thread_way["stdin, close, both streams, an exit code"] == (
        ("ready", "exit", 3), (out, err), {out: b"abc\x00\xff", err: b"err\n"})
    assert thread_way["no stdin: the half-close is its end"] == (("ready", "exit", 0), (), {out: b"", err: b""})
    assert thread_way["output in order"][2][out] == b"1\n2\n3\n"
    assert thread_way["more output than one frame"][2][out] == b"x" * 3_000_000
    assert thread_way["a second init"][0] == ("ready", grpc.StatusCode.INVALID_ARGUMENT)
    assert thread_way["a sandbox that does not exist"][0] == (grpc.StatusCode.NOT_FOUND,)
    assert thread_way["no command"][0] == (grpc.StatusCode.INVALID_ARGUMENT,)
    _call(channel, "DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id=sandbox_id, grace_period_seconds=0),
          pb.DeleteSandboxResponse)


def test_every_way_a_cancelled_call_kills_its_command(channel, monkeypatch):
    """The client cancels while its command runs (and reads stdin that never comes): the command's
    process is killed, and the sandbox runs the next command as before."""
    sandbox_id = _sandbox(channel)

    def cancel_one() -> tuple[int, int]:
        cancelled = threading.Event()

        def requests():  # init, then nothing: stdin stays open until the call is cancelled
            yield _init(sandbox_id, "sh", "-c", "echo $$; cat; echo never")
            cancelled.wait(30)  # bounded: a failed assertion must not leave gRPC's sender thread behind

        call = _stream(channel, requests())
        pid = None
        for response in call:
            if response.WhichOneof("message") == "output":
                pid = int(response.output.data)
                break
        call.cancel()
        cancelled.set()

        def gone() -> bool:
            kinds, _, _ = _outcome(channel, [_init(sandbox_id, "kill", "-0", str(pid))])
            return kinds[-1] != 0
        assert wait_until(gone, timeout=10), f"the command of a cancelled call (pid {pid}) still runs"
        kinds, _, data = _outcome(channel, [_init(sandbox_id, "echo", "after")])
        return kinds[-1], len(data[pb.ExecStreamOutput.STREAM_STDOUT])

    assert set(_every_way(monkeypatch, cancel_one).values()) == {(0, 6)}
    _call(channel, "DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id=sandbox_id, grace_period_seconds=0),
          pb.DeleteSandboxResponse)

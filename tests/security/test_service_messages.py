"""Malformed messages of every kind a client can send a ``sandpool serve``: control-plane requests
(Create, Get, List, Stop, Delete, Release, Lease, Attach's metadata) and each data-plane frame kind
(exec, stdin, credit, signal, read_file, write_file, call, cancel, ping, and kinds a client may not
send): wrong types, missing fields, NUL bytes, oversized values, unknown ids, broken framing.

Each one, sent raw over gRPC, must get that call a clear error naming the problem (the expected
text is the field's name or the value, so the check holds whichever layer, the shared wire schema
or the service's own rules, refuses it first), and nothing else: the attacked sandbox (the victim client's own, to which the attacker attaches) and its agent
keep executing for the victim, and the server keeps serving.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from service_helpers import ServerProcess

from sandpool import Session
from _sandpool_agent import wire as _wire
from sandpool._grpc import limits
from sandpool._grpc import messages as m

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
NUL = "a\0b"
LONG_ARGV = ["x" * 1024] * 2048  # 2 MiB of arguments: past the 1 MiB execve budget


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve")), listen=None) as srv:
        yield srv


@pytest.fixture
def victim(server):
    """Another client's session and sandbox, which must keep working through every attack."""
    with Session(address=server.address, defaults={"tags": ["victim"]}) as s:
        sb = s.sandbox()
        sb.wait()
        yield sb


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield ch
    ch.close()


def assert_victim_works(victim) -> None:
    assert victim.exec(["echo", "victim ok"]).result(timeout=30).stdout == "victim ok\n"


def frame(kind: str, **fields) -> bytes:
    """A wire frame of ``kind`` encoded as is (no validation: the attacker's own encoder)."""
    return _wire.encode({"t": kind, **fields})


# -- the data plane ------------------------------------------------------------------------------

BAD_FRAMES = {
    "exec argv not a list": (frame("exec", id=1, argv="ls"), "argv"),
    "exec argv of ints": (frame("exec", id=1, argv=[1, 2]), "argv"),
    "exec argv empty": (frame("exec", id=1, argv=[]), "is empty"),
    "exec NUL in argv": (frame("exec", id=1, argv=["echo", NUL]), "contains a NUL byte"),
    "exec argv too large": (frame("exec", id=1, argv=LONG_ARGV), "above the 1048576-byte limit"),
    "exec too many args": (frame("exec", id=1, argv=["x"] * 5000), "above the limit of 4096"),
    "exec env not a map": (frame("exec", id=1, argv=["true"], env=["A=1"]), "'env' must be dict"),
    "exec '=' in env name": (frame("exec", id=1, argv=["true"], env={"A=B": "1"}), "'='"),
    "exec empty env name": (frame("exec", id=1, argv=["true"], env={"": "1"}), "empty"),
    "exec NUL in env value": (frame("exec", id=1, argv=["true"], env={"A": NUL}), "NUL byte"),
    "exec env value not str": (frame("exec", id=1, argv=["true"], env={"A": 1}), "env"),
    "exec NUL in cwd": (frame("exec", id=1, argv=["true"], cwd=NUL), "NUL byte"),
    "exec cwd not str": (frame("exec", id=1, argv=["true"], cwd=7), "'cwd' must be str"),
    "exec stdin not bool": (frame("exec", id=1, argv=["true"], stdin="yes"), "'stdin' must be bool"),
    "exec id missing": (frame("exec", argv=["true"]), "'id' must be int"),
    "exec id too large": (frame("exec", id=1 << 40, argv=["true"]), "outside 0..2**32-1"),
    "stdin data not bytes": (frame("stdin", id=1, data="text"), "'data' must be bytes"),
    "stdin eof not bool": (frame("stdin", id=1, data=b"", eof=3), "'eof' must be bool"),
    "credit negative": (frame("credit", id=1, n=-5), "-5"),
    "credit not int": (frame("credit", id=1, n="many"), "'n' must be int"),
    "signal zero": (frame("signal", id=0, sig=0), "sig"),
    "signal too large": (frame("signal", id=0, sig=999), "sig"),
    "signal not int": (frame("signal", id=0, sig="KILL"), "'sig' must be int"),
    "read_file NUL in path": (frame("read_file", id=1, path="/etc/" + NUL), "NUL byte"),
    "read_file path not str": (frame("read_file", id=1, path=b"/etc/hostname"), "'path' must be str"),
    "read_file empty path": (frame("read_file", id=1, path=""), "is empty"),
    "read_file path too long": (frame("read_file", id=1, path="/" + "a" * 5000), "above the 4096"),
    "write_file NUL in path": (frame("write_file", id=1, path=NUL, data=b"x"), "NUL byte"),
    "write_file data not bytes": (frame("write_file", id=1, path="/tmp/x", data="x"), "'data' must be bytes"),
    "write_file bad mode": (frame("write_file", id=1, path="/tmp/x", data=b"", mode=-1), "mode"),
    "call fn not bytes": (frame("call", id=1, fn="f", args=b""), "'fn' must be bytes"),
    "call args missing": (frame("call", id=1, fn=b""), "'args' must be bytes"),
    "call negative timeout": (frame("call", id=1, fn=b"", args=b"", timeout=-1), "timeout"),
    "call NUL in args_path": (frame("call", id=1, fn=b"", args=b"", args_path=NUL), "NUL byte"),
    "cancel id not int": (frame("cancel", id="all"), "'id' must be int"),
    "cancel call not bool": (frame("cancel", id=1, call="yes"), "'call' must be bool"),
    "ping id not int": (frame("ping", id=None), "'id' must be int"),
    "stop (not a client kind)": (frame("stop", grace=0.0), "clients may not send 'stop'"),
    "worker listening elsewhere": (frame("worker", id=1, listen="/tmp/w"), "/tmp/.sandpool-worker-<hex>"),
    "spawn (not a client kind)": (frame("spawn", id=1, config={}), "clients may not send 'spawn'"),
    "a second hello": (_wire.encode(_wire.hello()), "clients may not send 'hello'"),
    "unknown kind": (frame("format_disk", id=1), "unknown frame kind"),
    "not a map": (b"\x00\x00\x00\x03" + _wire.msgpack.packb([1, 2]), "frame is not a map"),
    "undecodable": (b"\x00\x00\x00\x05garbage", "ndecodable"),
    "oversized header": (b"\x7f\xff\xff\xff", "above the"),
}


def _attach(channel, server, sandbox_id: str, *messages: bytes, timeout: float = 15) -> list[dict]:
    call = channel.stream_stream(m.path(m.ATTACH_METHOD))(
        iter(messages), metadata=(*server.metadata, (m.META_SANDBOX, sandbox_id)), timeout=timeout)
    buffer = _wire.FrameBuffer()
    return [f for message in call for f in buffer.feed(message)]


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_a_malformed_frame_ends_only_its_own_stream(server, victim, channel, case):
    """The attacker's stream ends INVALID_ARGUMENT naming the problem; the frame never reaches the
    agent, and the victim's sandbox (the same one) keeps executing."""
    data, text = BAD_FRAMES[case]
    with pytest.raises(grpc.RpcError) as info:
        _attach(channel, server, victim.sandbox_id, _wire.encode(_wire.hello()), data)
    assert info.value.code() == INVALID, info.value
    assert "malformed data-plane message" in info.value.details() and text in info.value.details(), \
        (text, info.value.details())
    assert_victim_works(victim)


def test_a_frame_before_hello_is_refused(server, victim, channel):
    """A stream that skips the handshake is refused at its first frame."""
    with pytest.raises(grpc.RpcError) as info:
        _attach(channel, server, victim.sandbox_id, frame("exec", id=1, argv=["id"]))
    assert info.value.code() == INVALID and "expected a 'hello' frame first" in info.value.details()
    assert_victim_works(victim)


def test_frames_for_unknown_ids_disturb_nothing(server, victim, channel):
    """stdin, credit, signal and cancel for ids this client never opened reach nobody else's process
    (ids are per client), and the stream itself carries on: a ping after them is answered."""
    frames = [_wire.encode(_wire.hello()), frame("stdin", id=77, data=b"x", eof=True),
              frame("credit", id=78, n=1 << 20), frame("signal", id=79, sig=9), frame("cancel", id=80),
              frame("ping", id=81)]
    answered = threading.Event()

    def requests():  # the stream stays open (a client that closes its side detaches) until answered
        yield from frames
        answered.wait(30)

    call = channel.stream_stream(m.path(m.ATTACH_METHOD))(
        requests(), metadata=(*server.metadata, (m.META_SANDBOX, victim.sandbox_id)), timeout=30)
    buffer = _wire.FrameBuffer()
    seen = []
    for message in call:
        seen += buffer.feed(message)
        if any(f["t"] == "pong" and f["id"] == 81 for f in seen):
            break
    answered.set()
    call.cancel()
    assert any(f["t"] == "pong" and f["id"] == 81 for f in seen), seen
    assert_victim_works(victim)


# -- the control plane ---------------------------------------------------------------------------

def _spec(**fields) -> dict:
    return {"tags": ["attack"], **fields}


BAD_REQUESTS = [
    ("Create", b"\xc1 not msgpack", INVALID, "undecodable Create request"),
    ("Create", m.pack([1, 2]), INVALID, "must be a msgpack map"),
    ("Create", m.pack({}), INVALID, "'spec' is missing"),
    ("Create", m.pack({"spec": "python"}), INVALID, "'spec' must be"),
    ("Create", m.pack({"spec": _spec(tgas=["x"])}), INVALID, "tgas"),
    ("Create", m.pack({"spec": _spec(command="echo\0hi")}), INVALID, "command contains a NUL byte"),
    ("Create", m.pack({"spec": _spec(args=["a", NUL], command="echo")}), INVALID, "args[1] contains a NUL"),
    ("Create", m.pack({"spec": _spec(environment_variables={"A=B": "1"})}), INVALID, "without '='"),
    ("Create", m.pack({"spec": _spec(working_dir="/w\0")}), INVALID, "working_dir contains a NUL"),
    ("Create", m.pack({"spec": _spec(tags="one")}), INVALID, "tags must be a list"),
    ("Create", m.pack({"spec": _spec(tags=[1])}), INVALID, "tags[0] must be a str"),
    ("Create", m.pack({"spec": _spec(tags=["t" * 300])}), INVALID, "above the 128-byte limit"),
    ("Create", m.pack({"spec": _spec(annotations={f"k{i}": "v" for i in range(100)})}), INVALID,
     "annotations has 100 entries"),
    ("Create", m.pack({"spec": _spec(), "lease": 5}), INVALID, "'lease' must be"),
    ("Create", m.pack({"spec": _spec(isolation="vm")}), INVALID, "isolation must be one of"),
    ("Create", m.pack({"spec": _spec(), "pad": b"x" * (limits.MAX_REQUEST_BYTES + 1)}), INVALID,
     "above this server's 1048576-byte limit"),
    ("Get", m.pack({}), INVALID, "'sandbox_id' is missing"),
    ("Get", m.pack({"sandbox_id": 5}), INVALID, "'sandbox_id' must be"),
    ("Get", m.pack({"sandbox_id": "sb-\0"}), INVALID, "sandbox_id contains a NUL"),
    ("Get", m.pack({"sandbox_id": "s" * 10_000}), INVALID, "above the 128-byte limit"),
    ("Get", m.pack({"sandbox_id": "sb-00000000"}), NOT_FOUND, "no sandbox 'sb-00000000'"),
    ("List", m.pack({"tags": "victim"}), INVALID, "'tags' must be"),
    ("List", m.pack({"tags": [1]}), INVALID, "tags[0] must be a str"),
    ("List", m.pack({"status": 5}), INVALID, "'status' must be"),
    ("List", m.pack({"status": "bogus"}), INVALID, "bogus"),
    ("Stop", m.pack({"sandbox_id": "sb-00000000", "grace": -1}), INVALID, "grace must be"),
    ("Stop", m.pack({"sandbox_id": "sb-00000000", "grace": "soon"}), INVALID, "'grace' must be"),
    ("Stop", m.pack({"sandbox_id": "sb-00000000", "grace": float("inf")}), INVALID, "grace must be"),
    ("Stop", m.pack({"sandbox_id": "sb-00000000"}), NOT_FOUND, "no sandbox"),
    ("Delete", m.pack({"sandbox_id": ["sb-1"]}), INVALID, "'sandbox_id' must be"),
    ("Delete", m.pack({"sandbox_id": "sb-00000000"}), NOT_FOUND, "no sandbox"),
    ("Release", m.pack({}), INVALID, "'lease' is missing"),
    ("Release", m.pack({"lease": 1}), INVALID, "'lease' must be"),
    ("Release", m.pack({"lease": "l" * 1000}), INVALID, "above the 128-byte limit"),
]


@pytest.mark.parametrize("method,request_bytes,code,text", BAD_REQUESTS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(BAD_REQUESTS)])
def test_a_malformed_request_gets_a_clear_error(server, victim, channel, method, request_bytes, code, text):
    """The call ends with INVALID_ARGUMENT (NOT_FOUND for an unknown id) naming the field; nothing is
    created or kept, and the victim's sandbox keeps executing."""
    def everything() -> list[dict]:
        reply = channel.unary_unary(m.path("List"))(m.pack({"show_terminated": True}), metadata=server.metadata,
                                                    timeout=30)
        return m.unpack(reply)["sandboxes"]

    before = everything()
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(m.path(method))(request_bytes, metadata=server.metadata, timeout=30)
    assert info.value.code() == code and text in info.value.details(), (text, info.value.code(), info.value.details())
    assert everything() == before
    assert_victim_works(victim)


def test_malformed_lease_and_attach_calls_get_a_clear_error(server, victim, channel):
    """An oversized Lease request, an Attach without or with a bad sandbox id, each end only their
    own call; the victim's sandbox keeps executing."""
    with pytest.raises(grpc.RpcError) as info:
        list(channel.unary_stream(m.path(m.LEASE_METHOD))(b"x" * (limits.MAX_REQUEST_BYTES + 1), timeout=30))
    assert info.value.code() == INVALID and "Lease request" in info.value.details()
    hello = _wire.encode(_wire.hello())
    for metadata, code, text in (((), INVALID, "needs the 'sandpool-sandbox' metadata"),
                                 (((m.META_SANDBOX, "s" * 1000),), INVALID, "above the 128-byte limit"),
                                 (((m.META_SANDBOX, "sb-00000000"),), NOT_FOUND, "no sandbox")):
        call = channel.stream_stream(m.path(m.ATTACH_METHOD))(iter([hello]), metadata=metadata, timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == code and text in info.value.details(), info.value.details()
    assert_victim_works(victim)

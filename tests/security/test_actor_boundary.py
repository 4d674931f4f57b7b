"""Actors keep the trust boundary of remote functions: nothing an actor's sandbox sends runs code
in the client, and a sandbox holding an actor handle reaches that actor only, through the client.

Each attack is what code inside a sandbox can do: return an object whose ``__reduce__`` is
``os.system``, forge a pickled answer on the worker's socket, or (holding a handle) forge ``ask``
frames naming an actor it was never given, an actor of another session, or arguments that are a
pickle. Each test asserts that the command did not run on the host (its marker file is never
created), that the call fails clearly, and that the actors go on working.
"""

from __future__ import annotations

import os
import pickle
import sys

import cloudpickle
import pytest

from sandpool import SerializationError, Session
from sandpool._functions import bulk as _bulk
from test_results import Evil  # unpickling it runs ``touch marker``

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def forge_answer(answer: dict) -> None:
    """Inside the sandbox: send ``answer`` for the running call on the worker's own socket, as
    hostile code that took the worker over would."""
    import gc
    import struct

    import msgpack

    worker = next(o for o in gc.get_objects() if type(o).__name__ == "Worker" and hasattr(o, "outbox"))
    body = msgpack.packb({**answer, "id": worker.current}, use_bin_type=True)
    worker.io.sendall(struct.pack(">I", len(body)) + body)


def forge_ask(token: bytes, method: str, args: bytes, seq: int = 10**6) -> object:
    """Inside the sandbox: send an ``ask`` frame of our own making to the agent and wait for its
    answer; returns the ``told`` frame's error (type name, message) or its decoded value."""
    import gc
    import struct

    import msgpack

    from _sandpool_agent import actors

    worker = next(o for o in gc.get_objects() if type(o).__name__ == "Worker" and hasattr(o, "outbox"))
    body = msgpack.packb({"t": "ask", "id": worker.current, "seq": seq, "token": token, "method": method, "args": args},
                         use_bin_type=True)
    worker.agent.sendall(struct.pack(">I", len(body)) + body)
    try:
        return actors.AskRef(seq, "forged").result()
    except actors.ActorCallError as exc:
        return exc.type_name, exc.message


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def bomb(self):
        return Evil(self.marker)

    def forged_pickle(self):
        forge_answer({"t": "result", "data": pickle.dumps(Evil(self.marker))})
        return "real"

    def ok(self):
        return "ok"


class Counter:
    def __init__(self):
        self.n = 0

    def incr(self, k=1):
        self.n += k
        return self.n


@pytest.fixture(params=["direct", "relay"])
def session(request, monkeypatch):
    if request.param == "relay":
        monkeypatch.setattr(_bulk, "host_dir", lambda sandbox: None)
    with Session() as s:
        yield s


def test_actor_returning_a_pickle_bomb_is_refused_in_the_sandbox(session, tmp_path):
    """A method returning an object whose __reduce__ is os.system fails with SerializationError
    (refused inside the sandbox); nothing runs here and the actor goes on."""
    marker = tmp_path / "pwned"
    actor = session.cls(Hostile).remote(str(marker))
    with pytest.raises(SerializationError, match="not plain data"):
        actor.bomb()
    assert not marker.exists()
    assert actor.ok() == "ok"


def test_forged_pickled_answer_of_an_actor_is_malformed_not_unpickled(session, tmp_path):
    """A pickle forged on the worker's socket as a method's result is not valid plain data: the
    call fails with SerializationError, nothing runs here, and the actor's next call works."""
    marker = tmp_path / "pwned"
    actor = session.cls(Hostile).remote(str(marker))
    with pytest.raises(SerializationError, match="not valid plain data"):
        actor.forged_pickle()
    assert not marker.exists()
    assert actor.ok() == "ok"


def test_sandbox_reaches_only_the_actors_it_was_given(session, tmp_path):
    """A sandbox holding one actor's handle cannot call another actor of the session by a token it
    makes up, nor pass a pickle as arguments (unpickled nowhere: refused as not plain data); the
    actor it was given still answers, and neither actor's state changed."""
    given = session.cls(Counter).remote()
    other = session.cls(Counter).remote()

    marker = tmp_path / "pwned"

    @session.function
    def attack(handle, marker):
        import os

        from _sandpool_agent import plain

        guessed = forge_ask(os.urandom(16), "incr", plain.encode(((1,), {})), seq=10**6)
        pickled = forge_ask(handle._token, "incr", pickle.dumps(((Evil(marker),), {})), seq=10**6 + 1)
        wrong_shape = forge_ask(handle._token, "incr", plain.encode([1, 2]), seq=10**6 + 2)
        no_method = forge_ask(handle._token, "__init__", plain.encode(((), {})), seq=10**6 + 3)
        return guessed, pickled, wrong_shape, no_method, handle.incr(5)

    guessed, pickled, wrong_shape, no_method, value = attack.remote(given, str(marker)).result(timeout=60)
    assert guessed[0] == "LookupError"
    assert pickled[0] == "TypeError" and "plain data" in pickled[1] and not marker.exists()
    assert wrong_shape[0] == "TypeError"
    assert no_method[0] == "AttributeError"
    assert value == 5
    assert given.incr() == 6 and other.incr() == 1


def test_a_handle_does_not_reach_across_sessions(tmp_path):
    """A handle of one session, given to a sandbox of another session, names no actor there."""
    with Session() as first, Session() as second:
        counter = first.cls(Counter).remote()

        @second.function
        def use(handle):
            from _sandpool_agent.actors import ActorCallError

            try:
                return handle.incr(1)
            except ActorCallError as exc:
                return exc.type_name

        assert use.remote(counter).result(timeout=60) == "LookupError"
        assert counter.incr() == 1

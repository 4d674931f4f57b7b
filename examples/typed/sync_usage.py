"""Typed sync use of sandpool: Session, Sandbox, exec, files, remote functions, map and actors.

tests/test_typing.py checks it with ``mypy --strict`` (each ``assert_type`` fails if a type is lost
or turns into ``Any``) and runs it, so it stays a working program.
"""

from __future__ import annotations

from typing import Any, assert_type

import sandpool
from sandpool import (ActorClass, ActorHandle, OperationRef, Process, ProcessResult, RemoteFunction, ResultStream,
                      Sandbox, SandboxDefaults, Session)


def square(n: int) -> int:
    return n * n


def greet(name: str, *, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


class Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    @sandpool.enter
    def warm(self) -> None:
        self.value += 0

    def add(self, n: int) -> int:
        self.value += n
        return self.value


def main() -> None:
    with Session(SandboxDefaults(tags=("typed",))) as session:
        sandbox = session.sandbox()
        assert_type(sandbox, Sandbox)
        proc = sandbox.exec(["echo", "hi"])
        assert_type(proc, Process)
        result = proc.result()
        assert_type(result, ProcessResult)
        assert_type(result.stdout, str)
        assert_type(result.returncode, int)
        lines = [line for line in sandbox.exec(["seq", "2"]).stdout]
        assert_type(lines, list[str])

        sandbox.write_file("/tmp/data.txt", b"payload").result()
        data = sandbox.read_file("/tmp/data.txt").result()
        assert_type(data, bytes)

        remote_square: RemoteFunction[[int], int] = session.function(square)
        one = remote_square.remote(3)
        assert_type(one, OperationRef[int])
        assert_type(one.result(), int)
        assert_type(remote_square(4), int)
        refs = remote_square.map([(n,) for n in range(3)])
        assert_type(refs, list[OperationRef[int]])
        stream = remote_square.imap(range(3))
        assert_type(stream, ResultStream[int])
        squares = [n for n in stream]
        assert_type(squares, list[int])

        @session.function(max_concurrency=1)
        def shout(text: str) -> str:
            return text.upper()

        assert_type(shout.remote("quiet").result(), str)
        assert_type(session.function(greet).remote("world", punctuation=".").result(), str)
        assert_type(shout.local("here"), str)

        # Actors keep their class's name, not its methods' signatures: calls give OperationRef[Any].
        # The call form, not '@session.cls' on the class: mypy ignores what a class decorator returns.
        counters = session.cls(Counter)
        assert_type(counters, ActorClass)
        counter = counters.remote(10)
        assert_type(counter, ActorHandle)
        total = counter.add.remote(5)
        assert_type(total, OperationRef[Any])
        print(result.stdout.strip(), data.decode(), one.result(), [r.result() for r in refs], squares,
              total.result())

    with Sandbox.run() as standalone:
        assert_type(standalone, Sandbox)
        done = standalone.exec(["true"]).result()
        assert_type(done, ProcessResult)
        print("typed sync ok", done.returncode)


if __name__ == "__main__":
    main()

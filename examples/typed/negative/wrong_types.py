"""Deliberate type errors: tests/test_typing.py asserts that mypy reports each line marked ``# E:``
with that error code, and nothing else. Never run (it is wrong on purpose)."""

from __future__ import annotations

from sandpool import Sandbox, Session


def square(n: int) -> int:
    return n * n


def check(session: Session, sandbox: Sandbox) -> None:
    remote_square = session.function(square)
    remote_square.remote("three")  # E: arg-type
    remote_square("three")  # E: arg-type
    remote_square.remote(3, 4)  # E: call-arg
    as_text: str = remote_square.remote(3).result()  # E: assignment

    @session.function(retries=2)
    def shout(text: str) -> str:
        return text.upper()

    shout.remote(text=5)  # E: arg-type

    result = sandbox.exec(["echo", "hi"]).result()
    result.upper()  # E: attr-defined
    joined: str = "out: " + result  # E: operator
    sandbox.exec("echo hi", cwd=3)  # E: arg-type
    data: str = sandbox.read_file("/etc/hostname").result()  # E: assignment
    print(as_text, joined, data)

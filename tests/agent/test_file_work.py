"""The agent's file operations at the end of a sandbox: one that finishes as the sandbox ends still
answers (a write the main command was waiting for), one that never finishes does not hold the end."""

import threading

from _sandpool_agent.files import FileWork


def test_drain_answers_an_operation_that_finishes_during_the_end():
    work = FileWork()
    release = threading.Event()
    work.submit(7, "/go", lambda: None if release.wait(10) else b"timed out")
    threading.Thread(target=release.set).start()
    assert work.drain(10.0) == [{"t": "result", "id": 7}]


def test_drain_gives_up_on_an_operation_that_never_finishes():
    work = FileWork()
    never = threading.Event()
    work.submit(1, "/fifo", lambda: None if never.wait(30) else b"")
    work.submit(2, "/f", lambda: b"data")
    assert work.drain(0.2) == [{"t": "result", "id": 2, "data": b"data"}]
    never.set()

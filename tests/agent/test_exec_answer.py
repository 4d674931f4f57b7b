"""A command that has ended by the time the agent's spawn returns is answered at once, with no fd
watched and no round of the agent's loop. That answer must be the one the loop gives: the same
output, exit code, signal and errors, a pipe still held by a child of the command waited for as the
loop waits for it, and nothing left behind. Each agent here runs in a process of its own, one
forced to take the at-once path for every command (its spawn returns only once the command has
exited), the other never to take it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from _sandpool_agent import wire
from _sandpool_agent.framesock import FrameSocket

AGENT = """
import os, socket, sys
from _sandpool_agent import agent, procs
mode, fd, sandbox_dir, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode == "at_once":
    spawn, ended_at_once = procs.spawn, agent.Agent._ended_at_once
    def spawn_and_wait(*args, **kwargs):
        proc = spawn(*args, **kwargs)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: the agent reaps it
        return proc
    def noted(self, proc):
        taken = ended_at_once(self, proc)
        with open(log, "a") as f:
            f.write("1" if taken else "0")
        return taken
    procs.spawn, agent.Agent._ended_at_once = spawn_and_wait, noted
else:
    agent.Agent._ended_at_once = lambda self, proc: False
os.chdir(sandbox_dir)
agent.serve(socket.socket(fileno=fd), {"dir": sandbox_dir, "root": "/", "cwd": sandbox_dir,
                                       "env": dict(os.environ), "sandbox_id": "sb-answer"})
"""

COMMANDS = [
    ["true"],
    ["sh", "-c", "echo out; echo err >&2; exit 3"],
    ["sh", "-c", "kill -9 $$"],
    ["head", "-c", "60000", "/dev/zero"],  # the pipe holds all of it
    ["sh", "-c", "exec >&- 2>&-; exit 5"],  # its pipes closed before it exits
    ["sh", "-c", 'echo a; (read x < "$RELEASE"; echo b) &'],  # a child of it holds the pipe until told
    ["no-such-program-here"],
]


class Agent:
    """An agent in a process of its own, spoken to over a socket pair."""

    def __init__(self, mode: str, sandbox_dir: str, log: str) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT, mode, str(theirs.fileno()), sandbox_dir, log],
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        ours.settimeout(30)
        self.sock = FrameSocket(ours)
        self.decoder = wire.FrameBuffer()
        self.pending: list[dict] = []
        assert self.next()["t"] == "hello"
        self.sock.send(wire.hello())

    def next(self) -> dict:
        while not self.pending:
            data = self.sock.sock.recv(1 << 20)  # at most 30 s
            assert data, "the agent closed its socket"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def run(self, req_id: int, argv: list[str], release: str) -> tuple:
        """(stdout, stderr, exit code, signal) of one exec; once it printed "a", a line goes to the
        FIFO ``release`` (in its environment as $RELEASE) for a child of it that waits for one."""
        self.sock.send({"t": "exec", "id": req_id, "argv": argv, "cwd": None, "env": {"RELEASE": release},
                        "stdin": False})
        out = {1: b"", 2: b""}
        while True:
            frame = self.next()
            assert frame["id"] == req_id, frame
            if frame["t"] == "output":
                out[frame["fd"]] += frame["data"]
                self.sock.send({"t": "credit", "id": req_id, "n": len(frame["data"])})
                if out[1] == b"a\n":
                    with open(release, "w") as fifo:
                        fifo.write("go\n")
            elif frame["t"] == "exit":
                return out[1], out[2], frame["code"], frame.get("signal")
            else:
                assert frame["t"] == "started", frame

    def stop(self) -> None:
        self.sock.send({"t": "stop", "grace": 0})
        assert self.proc.wait(30) == 0
        self.sock.sock.close()


@pytest.fixture
def agents(tmp_path):
    made = []

    def make(mode: str) -> Agent:
        sandbox_dir = tmp_path / mode
        sandbox_dir.mkdir()
        made.append(Agent(mode, str(sandbox_dir), str(tmp_path / "taken")))
        return made[-1]

    yield make
    for agent in made:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


def test_an_ended_command_gets_the_answer_the_loop_gives(agents, tmp_path):
    """Every command gets the same output, code and signal either way, and each that ended with its
    pipes closed was answered at once; the agent then serves on, and ends with its directory removed."""
    answers = {}
    for mode in ("at_once", "loop"):
        agent = agents(mode)
        release = str(tmp_path / "release")
        os.mkfifo(release)
        answers[mode] = [agent.run(i + 1, argv, release) for i, argv in enumerate(COMMANDS)]
        os.unlink(release)
        agent.sock.send({"t": "ping", "id": 99})
        assert agent.next() == {"t": "pong", "id": 99}
        agent.stop()
        assert not (tmp_path / mode).exists()
    assert answers["at_once"] == answers["loop"]
    assert answers["loop"][:6] == [(b"", b"", 0, None), (b"out\n", b"err\n", 3, None), (b"", b"", 137, 9),
                                   (b"\0" * 60000, b"", 0, None), (b"", b"", 5, None), (b"a\nb\n", b"", 0, None)]
    missing = answers["loop"][6]
    assert missing[2] == 127 and b"no-such-program-here" in missing[1]
    # all but the one whose pipe a child of it held (and the one that never started) took the at-once path
    assert (tmp_path / "taken").read_text() == "111110"

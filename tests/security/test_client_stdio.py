"""A sandbox's agent never holds the client's own stdout or stderr: code in a sandbox can open its
agent's descriptors (``/proc/<agent>/fd/1``), and through the client's would write into, or
truncate, the file the client's output goes to."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sandpool._isolation import probe

CLIENT = textwrap.dedent("""
    import sys
    from sandpool import Session
    print("client output before", flush=True)
    with Session(defaults={"isolation": sys.argv[1]}) as session:
        sb = session.sandbox()
        attack = ('agent=$(ps -o ppid= -p $$ 2>/dev/null || echo 1); '
                  'for pid in 1 $PPID $agent; do for fd in 1 2; do '
                  ': > /proc/$pid/fd/$fd; echo PWNED-$pid-$fd > /proc/$pid/fd/$fd; done; done; true')
        sb.exec(["sh", "-c", attack]).result()
        print("sandbox still works:", sb.exec(["echo", "yes"]).result().stdout.strip(), flush=True)
""")


@pytest.mark.parametrize("level", ["process", "namespaces"])
def test_a_sandbox_cannot_write_into_or_truncate_the_clients_output(tmp_path, level):
    why = probe.unavailable(level)
    if why:
        pytest.skip(f"{level} level unavailable: {why}")
    out, err = tmp_path / "client.out", tmp_path / "client.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.run([sys.executable, "-c", CLIENT, level], stdout=stdout, stderr=stderr, timeout=60)
    written, logged = out.read_text(), err.read_text()
    assert proc.returncode == 0, logged
    assert written == "client output before\nsandbox still works: yes\n"  # nothing added, nothing truncated
    for line in logged.splitlines():  # what reaches stderr is the agent's, labelled, through the log
        assert "PWNED" not in line or line.startswith("sandbox template "), line

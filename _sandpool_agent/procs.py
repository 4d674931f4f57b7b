"""One exec'd process inside the agent: its pipes, its flow-control window and its exit."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import termios

from . import wire as _wire
from . import linux as _linux

#: Output bytes the agent sends for one process before it waits for the client's credit.
WINDOW_BYTES = _wire.OUTPUT_WINDOW_BYTES
#: After the process exits, how long to wait for pipes held open by its background children.
LINGER_SECONDS = 1.0


class ExecProcess:
    """A process started for an ``exec`` frame (or the sandbox's main command, id 0).

    It owns raw pipe fds (never file objects, whose finalizers would close a reused fd number).
    """

    def __init__(self, req_id: int, popen: subprocess.Popen[bytes] | None, pid: int, pidfd: int | None,
                 readers: dict[int, int], stdin_fd: int | None) -> None:
        self.id = req_id
        self.popen = popen  # None when started with posix_spawn (nothing else then waits on the pid)
        self.pid = pid
        self.pidfd = pidfd
        self.readers = readers  # pipe fd -> 1 (stdout) or 2 (stderr)
        self.stdin_fd = stdin_fd
        self.stdin_pending = bytearray()
        self.stdin_eof = False
        self.stdin_taken = 0  # stdin bytes written to the pipe (or dropped) and not yet reported to the client
        self.unacked = 0
        self.paused = False
        self.status: int | None = None  # wait status once exited
        self.exited_at: float | None = None
        for fd in (*self.readers, *([self.stdin_fd] if self.stdin_fd is not None else [])):
            os.set_blocking(fd, False)

    @property
    def finished(self) -> bool:
        """Exited and every output pipe drained (or abandoned after the linger time)."""
        return self.status is not None and not self.readers

    def close_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)
        os.close(fd)

    def read_ended(self) -> list[tuple[int, bytes]]:
        """For an exited process: what its pipes hold now, as (1 or 2, bytes) chunks, each pipe that
        reached its end closed; one that a child of it still holds stays open."""
        chunks = []
        for fd in list(self.readers):
            for _ in range(2):  # what it wrote (an exited writer's pipe usually holds a chunk at most), the end
                data = read_pipe(fd)
                if data is None:
                    break
                if not data:
                    self.close_reader(fd)
                    break
                chunks.append((self.readers[fd], data))
        return chunks

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            try:
                os.close(self.stdin_fd)
            except OSError:
                pass
            self.stdin_fd = None
        self.stdin_taken += len(self.stdin_pending)
        self.stdin_pending.clear()

    def flush_stdin(self) -> bool:
        """Write what the pipe takes now; True while bytes are still pending."""
        if self.stdin_fd is None:
            return False
        try:
            while self.stdin_pending:
                n = os.write(self.stdin_fd, self.stdin_pending)
                del self.stdin_pending[:n]
                self.stdin_taken += n
        except BlockingIOError:
            return True
        except OSError:  # the process closed its stdin or exited: drop what it will never read
            self.close_stdin()
            return False
        if self.stdin_eof:
            self.close_stdin()
        return False

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the process is a session leader)."""
        if self.status is None:
            _linux.killpg_quietly(self.pid, sig)

    def close_all(self) -> None:
        for fd in list(self.readers):
            self.close_reader(fd)
        self.close_stdin()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def read_pipe(fd: int) -> bytes | None:
    """A chunk of output from the non-blocking pipe ``fd``: None if it has nothing now, b"" at its end
    (or once it broke)."""
    try:
        return os.read(fd, _wire.OUTPUT_CHUNK_BYTES)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def set_window(fd: int, cols: int, rows: int) -> None:
    """Set the size of the terminal whose master is ``fd`` (its foreground group gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:
    # In the child, after setsid (start_new_session): make the pty on fd 0 its controlling
    # terminal, so job control, ^C and SIGWINCH reach the foreground process group.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def spawn_tty(req_id: int, argv: list[str], cwd: str, env: dict[str, str], cols: int, rows: int) -> ExecProcess:
    """Start ``argv`` on a new pseudo-terminal of ``cols`` x ``rows``: its stdin, stdout and stderr
    are the terminal, whose output comes back as stdout (fd 1) and whose input is the stdin pipe.
    Costs a full fork (a ``preexec_fn``), which only interactive terminals pay. OSError if it cannot start."""
    master, slave = os.openpty()
    try:
        set_window(master, cols, rows)
        popen = subprocess.Popen(argv, cwd=cwd, env={"TERM": "xterm-256color", **env}, stdin=slave,
                                 stdout=slave, stderr=slave, start_new_session=True, close_fds=True,
                                 preexec_fn=_take_terminal)
        writer = os.dup(master)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        pidfd = None
    return ExecProcess(req_id, popen, popen.pid, pidfd, {master: 1}, writer)


_devnull: list[int] = []  # /dev/null opened once (in the agent, after its root is set up), for stdin


def _dev_null() -> int:
    if not _devnull:
        _devnull.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return _devnull[0]


def spawn(req_id: int, argv: list[str], cwd: str, env: dict[str, str], stdin: bool,
          output_fd: int | None = None) -> ExecProcess:
    """Start ``argv`` in a session of its own. OSError if it cannot start.

    Output goes to pipes read by the agent, or to ``output_fd`` (stdout and stderr) when given.
    In the agent's own directory it starts with posix_spawn (a vfork and an exec, none of Popen's
    Python-side work: about half the agent's time per exec); elsewhere with Popen. No
    ``preexec_fn`` (it would cost ~1 ms per exec by forcing a full fork): if the agent is killed,
    its children are re-parented to the template, a child subreaper, which kills them.
    """
    ours: list[int] = []
    theirs: list[int] = []
    try:
        if output_fd is None:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            ours += [out_r, err_r]
            theirs += [out_w, err_w]
            readers = {out_r: 1, err_r: 2}
        else:
            out_w = err_w = output_fd
            readers = {}
        in_r = in_w = None
        if stdin:
            in_r, in_w = os.pipe()
            ours.append(in_w)
            theirs.append(in_r)
        stdin_r = in_r if in_r is not None else _dev_null()
        popen = None
        if _can_posix_spawn(cwd):
            pid = _posix_spawn(argv, env, stdin_r, out_w, err_w)
        else:
            popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin_r, stdout=out_w, stderr=err_w,
                                     start_new_session=True, close_fds=True)
            pid = popen.pid
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    return ExecProcess(req_id, popen, pid, pidfd, readers, in_w)


# -- posix_spawn: the common exec (in the agent's own directory) without Popen's Python-side work ----

_spawn_state: dict[str, str | None] = {}  # "cwd": the agent's directory once every fd is close-on-exec


def _can_posix_spawn(cwd: str) -> bool:
    """True when ``cwd`` is the agent's own directory (posix_spawn cannot change it) and every fd
    the agent holds is close-on-exec (what ``close_fds=True`` gives a Popen child)."""
    if "cwd" not in _spawn_state:
        _spawn_state["cwd"] = os.getcwd() if _seal_fds() else None
    return cwd == _spawn_state["cwd"]


def _seal_fds() -> bool:
    """Mark every open fd above stderr close-on-exec (fds created by Python already are; one passed
    in over a socket is not). False when the open fds cannot be listed."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        return False
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own fd, closed since
    return True


def _posix_spawn(argv: list[str], env: dict[str, str], stdin_fd: int, out_fd: int, err_fd: int) -> int:
    """Start ``argv`` as Popen would (``env``'s PATH searched the same way, the first error that is
    not 'no such file' reported) with stdin, stdout and stderr on the given fds, in a new session."""
    actions = [(os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, out_fd, 1),
               (os.POSIX_SPAWN_DUP2, err_fd, 2)]
    if not argv:
        raise ValueError("argv is empty: give the program to run as its first item")
    program = argv[0]
    if os.path.dirname(program):
        candidates = [program]
    elif env.get("PATH") is not None and env.get("PATH") == os.environ.get("PATH"):
        # the agent's own PATH (its C environment is the sandbox's): the search runs in C, in the
        # child, as execvp's; half the agent's time per exec next to one in Python
        return os.posix_spawnp(program, argv, env, file_actions=actions, setsid=True)
    else:
        candidates = [os.path.join(d, program) for d in os.get_exec_path(env)]
    first_error: OSError | None = None
    last_error: OSError | None = None
    for path in candidates:
        if len(candidates) > 1:
            try:
                os.stat(path)
            except (FileNotFoundError, NotADirectoryError) as exc:
                last_error = exc  # what execve would say, without a process started to say it
                continue
            except OSError:
                pass  # execve says it (or finds it runs after all)
        try:
            return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True)
        except OSError as exc:
            last_error = exc
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and first_error is None:
                first_error = exc
    error = first_error or last_error
    if error is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    raise error

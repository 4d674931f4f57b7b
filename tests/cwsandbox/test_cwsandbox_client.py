"""The published cwsandbox client, unmodified, against a local ``python -m sandpool._cwsandbox`` server.

Each program below is plain cwsandbox code (``import cwsandbox``) run in a subprocess whose only
link to sandpool is ``CWSANDBOX_BASE_URL=http://127.0.0.1:PORT``; it asserts what the cloud would
give and prints OK. After every test the server must hold no live sandbox, and the autouse leak
check must find no sandbox process or directory (the server shares the test run's state dir).
The client is pip-installed into this venv when missing; without PyPI the tests skip, saying so.
"""

from __future__ import annotations

import importlib.metadata
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import leaks
from service_helpers import wait_until

from sandpool._cwsandbox._proto import SERVICE, pb

PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT_REQUIREMENT = "cwsandbox[cli]==1.22.*"


def _client_version() -> str | None:
    try:
        importlib.metadata.version("click")
        return importlib.metadata.version("cwsandbox")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="session")
def cwsandbox_client() -> str:
    """The published client (with its CLI) in this venv: installed from PyPI if missing."""
    version = _client_version()
    if version is None:
        done = subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               CLIENT_REQUIREMENT], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot install {CLIENT_REQUIREMENT} from PyPI ({tail})")
        version = _client_version()
    if version is None or not version.startswith("1.22."):
        pytest.skip(f"cwsandbox {version} is installed; these tests pin {CLIENT_REQUIREMENT}")
    return version


#: "the key the server expects" (its token, or the one it made)
SERVER_KEY = "<the server's key>"


class Server:
    """``python -m sandpool._cwsandbox --listen 127.0.0.1:0 ...`` in a subprocess; ``address`` once it serves."""

    def __init__(self, tmp_path, *args: str, token: str | None = None) -> None:
        self.workdir = tmp_path
        self.token = token
        self.argv = [PYTHON, "-m", "sandpool._cwsandbox", "--listen", "127.0.0.1:0", *args]
        if token is not None:
            token_file = tmp_path / "token"
            token_file.write_text(token + "\n")
            self.argv += ["--token-file", str(token_file)]
        self.stderr_path = tmp_path / "server.err"
        # An empty image store: every image name runs on the host, whatever this machine has built.
        env = {k: v for k, v in os.environ.items() if k not in ("SANDPOOL_ADDRESS", "SANDPOOL_TOKEN")}
        env["SANDPOOL_IMAGE_FALLBACK"] = "host"  # its specs name python:3.11; no registry is reachable here
        env.update(GRPC_VERBOSITY="ERROR", SANDPOOL_IMAGE_DIR=str(tmp_path / "images"))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=REPO)
        leaks.server_started(self.proc.pid)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        if " on " not in line:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r} {self.stderr_path.read_text()}")
        self.address = line.split(" on ", 1)[1].split(";")[0].strip()
        if token is None:  # the server made a key and wrote it 0600 to the file its export line names
            export = self.proc.stdout.readline().decode()
            with open(export.split("$(cat ", 1)[1].split(")", 1)[0]) as f:
                self.token = f.read().strip()
        self.channel = grpc.insecure_channel(self.address)

    def call(self, method: str, request, response_type, *, metadata=None, timeout: float = 10.0):
        """One unary RPC of SandboxService, with sandpool's own copies of the message types (and the
        server's key, unless ``metadata`` says otherwise)."""
        if metadata is None:
            metadata = (("authorization", f"Bearer {self.token}"),)
        rpc = self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                                       response_deserializer=response_type.FromString)
        return rpc(request, metadata=metadata, timeout=timeout)

    def live(self, api_key: str | None = None) -> list[str]:
        """Ids of the sandboxes the server still runs (asked with the server's token, or ``api_key``)."""
        key = api_key or self.token
        reply = self.call("ListSandboxes", pb.ListSandboxesRequest(), pb.ListSandboxesResponse,
                          metadata=(("authorization", f"Bearer {key}"),) if key else ())
        return [sb.sandbox_id for sb in reply.sandboxes]

    def env(self, api_key: str | None = SERVER_KEY) -> dict[str, str]:
        env = {**os.environ, "CWSANDBOX_BASE_URL": f"http://{self.address}", "GRPC_VERBOSITY": "ERROR"}
        env.pop("CWSANDBOX_API_KEY", None)
        if api_key is SERVER_KEY:
            api_key = self.token
        if api_key is not None:
            env["CWSANDBOX_API_KEY"] = api_key
        return env

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        leaks.server_stopped(self.proc.pid)


def _server(tmp_path_factory, *args: str, token: str | None = None):
    server = Server(tmp_path_factory.mktemp("cwsandbox"), *args, token=token)
    yield server
    server.stop()
    assert server.proc.returncode == 0, server.stderr_path.read_text()
    leaks.check("the cwsandbox server, once stopped,")


@pytest.fixture(scope="module")
def server(cwsandbox_client, tmp_path_factory):
    yield from _server(tmp_path_factory)


@pytest.fixture(scope="module")
def process_server(cwsandbox_client, tmp_path_factory):
    """A server whose sandboxes run at the ``process`` level (commands see the host's filesystem)."""
    yield from _server(tmp_path_factory, "--isolation", "process")


@pytest.fixture(scope="module")
def token_server(cwsandbox_client, tmp_path_factory):
    yield from _server(tmp_path_factory, token="s3cret-token")


def run(server: Server, program: str, *, api_key: str | None = SERVER_KEY, leave_running: bool = False,
        timeout: float = 60.0) -> str:
    """Run a cwsandbox program against ``server``; it must exit 0 and (unless ``leave_running``) leave
    no live sandbox. Its stdout."""
    path = server.workdir / f"program_{time.monotonic_ns()}.py"  # a file: inspect.getsource needs one
    path.write_text(textwrap.dedent(program))
    done = subprocess.run([PYTHON, str(path)], capture_output=True, text=True, env=server.env(api_key),
                          timeout=timeout, cwd=REPO)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    if not leave_running:
        assert_nothing_left(server)
    return done.stdout


def cli(server: Server, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """The client's own CLI, ``cwsandbox ARGS``."""
    return subprocess.run([PYTHON, "-m", "cwsandbox", *args], capture_output=True, text=True,
                          env=server.env(), timeout=timeout, cwd=REPO)


def assert_nothing_left(server: Server) -> None:
    # 15 s: a bound for a hang; a sandbox ends within milliseconds of its block
    assert wait_until(lambda: not server.live(), timeout=15), f"sandboxes left running: {server.live()}"


# -- the Session guide, example by example ---------------------------------------------------------


def test_basic_usage(server):
    """Two sandboxes of one session run commands; leaving the block stops both."""
    out = run(server, """
        import cwsandbox
        from cwsandbox import SandboxDefaults, SandboxStatus

        defaults = SandboxDefaults(container_image="python:3.11", tags=("project-alpha",))
        with cwsandbox.Session(defaults=defaults) as session:
            sb1 = session.sandbox()
            sb2 = session.sandbox()
            result1 = sb1.exec(["echo", "sandbox 1"]).result()
            result2 = sb2.exec(["echo", "sandbox 2"]).result()
            assert (result1.stdout, result2.stdout) == ("sandbox 1\\n", "sandbox 2\\n"), (result1, result2)
            assert result1.returncode == 0 and sb1.status == SandboxStatus.RUNNING
            assert sb1.sandbox_id != sb2.sandbox_id and sb1.tags == ("project-alpha",)
        assert sb1.status == sb2.status == SandboxStatus.TERMINATED, (sb1.status, sb2.status)
        print("OK")
    """)
    assert out == "OK\n"


def test_lazy_then_explicit_start_and_wait(server):
    """session.sandbox() sends nothing; start() creates it; wait() returns once it runs; exec works."""
    run(server, """
        import cwsandbox
        from cwsandbox import SandboxStatus

        with cwsandbox.Session() as session:
            sandbox = session.sandbox()
            assert sandbox.sandbox_id is None and sandbox.status is None
            sandbox.start().result()
            assert sandbox.sandbox_id is not None
            assert sandbox.wait() is sandbox and sandbox.status == SandboxStatus.RUNNING
            assert sandbox.started_at is not None and sandbox.runner_id
            assert sandbox.exec(["echo", "hello"]).result().stdout == "hello\\n"
            lazy = session.sandbox()
            assert lazy.exec(["echo", "auto-started"]).result().stdout == "auto-started\\n"
    """)


def test_overriding_defaults(server):
    """Per-sandbox command, args, image, resources and tags override the session's defaults."""
    run(server, """
        import cwsandbox
        from cwsandbox import ResourceOptions, SandboxDefaults

        defaults = SandboxDefaults(container_image="python:3.11", tags=("my-project",),
                                   environment_variables={"STAGE": "dev", "KEEP": "1"})
        with cwsandbox.Session(defaults=defaults) as session:
            big = session.sandbox(
                command="sleep", args=["infinity"], container_image="python:3.12",
                resources=ResourceOptions(requests={"cpu": "500m", "memory": "256Mi"},
                                          limits={"cpu": "1", "memory": "512Mi"}),
                tags=["big"], environment_variables={"STAGE": "prod"})
            out = big.exec(["sh", "-c", "echo $STAGE $KEEP"]).result().stdout
            assert out == "prod 1\\n", out
            assert big.tags == ("my-project", "big"), big.tags
            assert big.resource_requests == {"cpu": "500m", "memory": "256Mi"}, big.resource_requests
            assert big.containers[0].image == "python:3.12"  # reported back as asked
            plain = session.sandbox()
            assert plain.exec(["sh", "-c", "echo $STAGE"]).result().stdout == "dev\\n"
    """)


def test_pool_of_five(server):
    """Five sandboxes run commands in parallel; each reports its own output."""
    run(server, """
        import cwsandbox
        from cwsandbox import SandboxDefaults

        with cwsandbox.Session(defaults=SandboxDefaults(tags=("pool",))) as session:
            pool = [session.sandbox() for _ in range(5)]
            refs = [sb.exec(["sh", "-c", f"echo worker {i}"]) for i, sb in enumerate(pool)]
            results = [ref.result() for ref in refs]
            assert [r.stdout for r in results] == [f"worker {i}\\n" for i in range(5)], results
            assert len({sb.sandbox_id for sb in pool}) == 5 and session.sandbox_count == 5
    """)


def test_manual_close(server):
    """Without a with block, close().result() stops every sandbox and the session refuses new ones."""
    run(server, """
        import cwsandbox
        from cwsandbox import SandboxError, SandboxStatus

        session = cwsandbox.Session()
        sandboxes = [session.sandbox() for _ in range(2)]
        for sb in sandboxes:
            sb.exec(["true"]).result()
        session.close().result()
        assert session.sandbox_count == 0
        assert all(sb.status == SandboxStatus.TERMINATED for sb in sandboxes), [sb.status for sb in sandboxes]
        try:
            session.sandbox()
        except SandboxError:
            pass
        else:
            raise AssertionError("a closed session made a sandbox")
    """)


def test_error_handling(server):
    """An exception leaves the block and still stops the sandboxes; check=True, timeouts and unknown ids
    raise the client's own exceptions."""
    run(server, """
        import cwsandbox
        from cwsandbox import (Sandbox, SandboxExecutionError, SandboxNotFoundError, SandboxStatus,
                               SandboxTimeoutError)

        class JobFailed(Exception):
            pass

        pool = []
        try:
            with cwsandbox.Session() as session:
                pool = [session.sandbox() for _ in range(2)]
                assert pool[0].exec(["sh", "-c", "exit 3"]).result().returncode == 3
                try:
                    pool[0].exec(["sh", "-c", "echo disk full >&2; exit 3"], check=True).result()
                except SandboxExecutionError as exc:
                    assert exc.exec_result.returncode == 3 and exc.exec_result.stderr == "disk full\\n"
                else:
                    raise AssertionError("check=True did not raise")
                try:
                    pool[1].exec(["sleep", "30"], timeout_seconds=0.5).result()
                except SandboxTimeoutError:
                    pass
                else:
                    raise AssertionError("the timeout did not fire")
                assert pool[1].exec(["echo", "still usable"]).result().stdout == "still usable\\n"
                raise JobFailed("gave up")
        except JobFailed:
            pass
        assert [sb.status for sb in pool] == [SandboxStatus.TERMINATED] * 2, [sb.status for sb in pool]
        try:
            Sandbox.from_id("sb-00000000").result()
        except SandboxNotFoundError:
            pass
        else:
            raise AssertionError("an unknown id was found")
        Sandbox.delete("sb-00000000", missing_ok=True).result()
    """)


def test_list_then_adopt(server):
    """Sandboxes found by tag with Sandbox.list are adopted; closing the session stops them."""
    run(server, """
        import cwsandbox
        from cwsandbox import Sandbox, SandboxDefaults, SandboxStatus

        orphans = [Sandbox.run(tags=["orphaned-work", f"shard-{i}"]) for i in range(3)]
        other = Sandbox.run(tags=["something-else"])
        for sb in orphans + [other]:
            sb.wait()
        found = Sandbox.list(tags=["orphaned-work"]).result()
        assert sorted(sb.sandbox_id for sb in found) == sorted(sb.sandbox_id for sb in orphans), found
        assert Sandbox.list(tags=["orphaned-work", "shard-1"]).result()[0].sandbox_id == orphans[1].sandbox_id
        with cwsandbox.Session() as session:
            for sb in found:
                session.adopt(sb)
            assert session.sandbox_count == 3
            assert found[0].exec(["echo", "adopted"]).result().stdout == "adopted\\n"
        assert Sandbox.list(tags=["orphaned-work"]).result() == []
        ended = Sandbox.list(tags=["orphaned-work"], show_terminated=True).result()
        assert len(ended) == 3 and {sb.status for sb in ended} == {SandboxStatus.TERMINATED}
        with cwsandbox.Session(defaults=SandboxDefaults(tags=("something-else",))) as session:
            adopted = session.list(adopt=True).result()
            assert [sb.sandbox_id for sb in adopted] == [other.sandbox_id] and session.sandbox_count == 1
        assert Sandbox.from_id(other.sandbox_id).result().status == SandboxStatus.TERMINATED
    """)


def test_sandbox_count(server):
    """sandbox_count follows session.sandbox(), stop() and close()."""
    run(server, """
        import cwsandbox

        with cwsandbox.Session() as session:
            a, b = session.sandbox(), session.sandbox()
            assert session.sandbox_count == 2
            a.exec(["true"]).result()
            a.stop().result()
            assert session.sandbox_count == 1
            b.wait()
        assert session.sandbox_count == 0
    """)


def test_sandbox_run_standalone(server):
    """Sandbox.run(): a context manager stops it; a main command runs to COMPLETED with its exit code
    and its output in the logs; a failing one is FAILED with a reason."""
    run(server, """
        from cwsandbox import Sandbox, SandboxFailedError, SandboxStatus

        with Sandbox.run() as sb:
            assert sb.exec(["echo", "hello"]).result().stdout == "hello\\n"
        assert sb.status == SandboxStatus.TERMINATED

        job = Sandbox.run("sh", "-c", "echo line one; echo line two; sleep 0.3")
        job.wait_until_complete(timeout=30).result()
        assert (job.status, job.returncode) == (SandboxStatus.COMPLETED, 0), (job.status, job.returncode)
        assert list(job.stream_logs()) == ["line one\\n", "line two\\n"]
        assert list(job.stream_logs(tail_lines=1)) == ["line two\\n"]

        bad = Sandbox.run("sh", "-c", "exit 3")
        try:
            bad.wait_until_complete(timeout=30).result()
        except SandboxFailedError as exc:
            assert "3" in (exc.status_reason or ""), exc.status_reason
        else:
            raise AssertionError(f"a failed main command reported {bad.status}")
        assert bad.status == SandboxStatus.FAILED

        with Sandbox.run(mounted_files=[{"mount_path": "/tmp/cfg/app.yaml", "file_content": b"a: 1\\n"}]) as sb:
            assert sb.exec(["cat", "/tmp/cfg/app.yaml"]).result().stdout == "a: 1\\n"  # there before RUNNING
            sb.exec(["rm", "-r", "/tmp/cfg"]).result()
        unmountable = Sandbox.run(mounted_files=[{"mount_path": "/", "file_content": b"x"}])
        try:
            unmountable.wait(timeout=30)
        except SandboxFailedError as exc:
            assert "could not mount '/'" in exc.status_reason, exc.status_reason
        else:
            raise AssertionError(f"a file mounted on / left the sandbox {unmountable.status}")
    """)


# -- beyond the guide: functions, streams, files, logs, lifetime ----------------------------------


FUNCTIONS = """
    import cwsandbox
    from cwsandbox import SandboxDefaults, SandboxExecutionError

    with cwsandbox.Session(defaults=SandboxDefaults(tags=("functions",))) as session:
        @session.function()
        def square(x):
            return x * x

        @session.function()
        def describe(name, *, scale=1):
            import os
            return {"name": name, "scaled": [v * scale for v in (1, 2)], "cwd": os.getcwd() != ""}

        @session.function()
        def fails(x):
            raise ValueError(f"bad input {x}")

        assert square.remote(7).result() == 49
        assert [r.result() for r in square.map([(i,) for i in range(4)])] == [0, 1, 4, 9]
        assert describe.remote("a", scale=3).result() == {"name": "a", "scaled": [3, 6], "cwd": True}
        try:
            fails.remote(5).result()
        except SandboxExecutionError as exc:
            assert (exc.exception_type, exc.exception_message) == ("ValueError", "bad input 5"), exc
        else:
            raise AssertionError("the remote exception was lost")
        assert square.local(3) == 9
    assert session.sandbox_count == 0
"""


def test_function_decorator(server):
    """@session.function ships source and JSON, runs ``python -c`` in a fresh sandbox per call, and brings
    back results and remote exceptions."""
    run(server, FUNCTIONS)


def test_exec_stdin_and_streaming(server):
    """stdin reaches the command in order and EOF ends it; stdout and stderr stream while it runs, bytes
    intact."""
    run(server, """
        import time
        import cwsandbox

        with cwsandbox.Session() as session:
            sb = session.sandbox()
            proc = sb.exec(["sh", "-c", "while read line; do echo got:$line; done; echo eof >&2"], stdin=True)
            for i in range(3):
                proc.stdin.writeline(f"line {i}").result()
            proc.stdin.close().result()
            result = proc.result()
            assert result.stdout == "got:line 0\\ngot:line 1\\ngot:line 2\\n" and result.stderr == "eof\\n", result

            started = time.monotonic()
            proc = sb.exec(["sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done"])
            seen = []
            for chunk in proc.stdout:
                seen.append((round(time.monotonic() - started, 1), chunk))
            assert "".join(c for _, c in seen) == "tick 1\\ntick 2\\ntick 3\\n", seen
            # streamed: the ticks come 0.3 s apart (gathered at the end they would come together);
            # a slow start shifts them all and leaves the gap as it is
            assert seen[-1][0] - seen[0][0] > 0.4, f"output was not streamed: {seen}"
            assert proc.result().returncode == 0

            raw = sb.exec(["sh", "-c", "printf '\\\\377\\\\000\\\\303\\\\251'"]).result()
            assert raw.stdout_bytes == b"\\xff\\x00\\xc3\\xa9", raw.stdout_bytes
            big = sb.exec(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\\\0' x"]).result()
            assert big.stdout == "x" * 3_000_000
    """)


FILES = """
    import uuid
    import cwsandbox
    from cwsandbox import SandboxFileError

    with cwsandbox.Session() as session:
        sb = session.sandbox()
        work = f"/tmp/cwsandbox-files-{uuid.uuid4().hex}"
        payload = bytes(range(256)) * 1000
        sb.write_file(f"{work}/data.bin", payload).result()
        assert sb.read_file(f"{work}/data.bin").result() == payload
        sb.write_file(f"{work}/script.py", b"print('ran from a written file')").result()
        assert sb.exec(["python", f"{work}/script.py"]).result().stdout == "ran from a written file\\n"
        sb.exec(["sh", "-c", f"echo made by a command > {work}/made.txt"]).result()
        assert sb.read_file(f"{work}/made.txt").result() == b"made by a command\\n"
        sb.exec(["rm", "-r", work], check=True).result()
        for path, reason in (("/tmp/no/such/file", "CWSANDBOX_FILE_NOT_FOUND"),
                             ("/tmp", "CWSANDBOX_FILE_IS_DIRECTORY")):
            try:
                sb.read_file(path).result()
            except SandboxFileError as exc:
                assert exc.reason == reason and exc.filepath == path, (exc.reason, exc.filepath)
            else:
                raise AssertionError(f"reading {path} did not fail")
"""


def test_file_read_write(server):
    """write_file then read_file round-trips bytes; commands see the files (and the reverse); missing
    files and directories raise SandboxFileError with cwsandbox's reasons."""
    run(server, FILES)


def test_files_and_functions_at_the_process_level(process_server):
    """At the process level a sandbox's commands see the host's filesystem; files follow them, so
    write-then-run and @session.function still work."""
    started = time.time()
    try:
        run(process_server, FILES)
        run(process_server, FUNCTIONS)
    finally:  # the client leaves its payload and result files in /tmp, here the host's
        for name in os.listdir("/tmp"):
            path = os.path.join("/tmp", name)
            if name.startswith(("sandbox_payload_", "sandbox_result_")) and os.stat(path).st_mtime >= started:
                os.unlink(path)


def test_a_sandbox_dying_under_a_command_is_an_in_band_error(process_server):
    """When the sandbox dies mid-exec the stream ends with an in-band error: SandboxExecutionError with
    reason SANDBOX_DIED; the sandbox is then FAILED, saying how it died."""
    run(process_server, """
        from cwsandbox import Sandbox, SandboxExecutionError, SandboxStatus
        sb = Sandbox.run()
        try:
            sb.exec(["sh", "-c", "echo before; kill -9 $PPID; sleep 5"]).result()  # $PPID: the sandbox's agent
        except SandboxExecutionError as exc:
            assert exc.reason == "SANDBOX_DIED", exc
        else:
            raise AssertionError("the command outlived its sandbox")
        try:
            sb.wait_until_complete(timeout=30).result()
        except Exception as exc:
            assert "SIGKILL" in str(exc), exc
        assert sb.status == SandboxStatus.FAILED, sb.status
    """)


def test_logs_follow_and_lifetime(server):
    """stream_logs(follow=True) streams the main command's output as it comes; timestamps=True prefixes
    each line; max_lifetime_seconds ends a sandbox on its own."""
    run(server, """
        import time
        from datetime import datetime
        from cwsandbox import Sandbox, SandboxStatus

        job = Sandbox.run("sh", "-c", "for i in 1 2 3; do echo step $i; sleep 1; done")
        job.wait()
        started = time.monotonic()
        lines = [(time.monotonic() - started, line) for line in job.stream_logs(follow=True)]
        assert [l for _, l in lines] == ["step 1\\n", "step 2\\n", "step 3\\n"], lines
        # followed live: step 3 comes a second after step 2 (a late start at most shifts earlier lines)
        assert lines[-1][0] - lines[-2][0] > 0.5, f"not followed live: {lines}"
        stamped = list(job.stream_logs(timestamps=True))
        when, text = stamped[0].split(" ", 1)
        assert text == "step 1\\n" and datetime.fromisoformat(when.replace("Z", "+00:00")), stamped
        job.wait_until_complete(timeout=30).result()

        short = Sandbox.run(max_lifetime_seconds=1)
        short.wait()
        short.wait_until_complete(timeout=30, raise_on_termination=False).result()
        assert short.status == SandboxStatus.TERMINATED, short.status
    """)


# -- the client's CLI -------------------------------------------------------------------------------


def test_cli(server):
    """cwsandbox ls lists a running sandbox, exec streams and exits with the remote code, get and files
    work on it, stop ends it."""
    # A standalone Sandbox.run() outlives its program, as in the cloud: the CLI then works on it.
    sandbox_id = run(server, """
        from cwsandbox import Sandbox
        sb = Sandbox.run(tags=["cli-test"])
        sb.wait()
        print(sb.sandbox_id)
    """, leave_running=True).strip()
    listed = cli(server, "ls", "--tag", "cli-test")
    assert listed.returncode == 0 and sandbox_id in listed.stdout and "running" in listed.stdout, listed
    done = cli(server, "exec", sandbox_id, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n"), done
    assert "running" in cli(server, "ls", "--output", "json").stdout
    assert "python:3.11" in cli(server, "get", sandbox_id).stdout
    local = server.workdir / "upload.txt"
    local.write_text("uploaded\n")
    assert cli(server, "files", "write", sandbox_id, "/tmp/cli-upload.txt", str(local)).returncode == 0
    assert cli(server, "files", "read", sandbox_id, "/tmp/cli-upload.txt").stdout == "uploaded\n"
    cli(server, "exec", sandbox_id, "--", "rm", "/tmp/cli-upload.txt")
    stopped = cli(server, "stop", sandbox_id)
    assert stopped.returncode == 0, stopped
    assert cli(server, "ls", "--tag", "cli-test").stdout.strip() == "No sandboxes found."
    missing = cli(server, "exec", "sb-00000000", "--", "true")
    assert missing.returncode != 0 and "not found" in missing.stderr.lower(), missing
    assert_nothing_left(server)


# -- the protocol itself: auth, idempotency, paging, cancellation, errors -------------------------


def test_api_key_is_checked_when_the_server_has_a_token(token_server):
    """With a token, a wrong or missing CWSANDBOX_API_KEY is CWSandboxAuthenticationError saying what to
    set, and nothing is created; the right one works."""
    program = """
        from cwsandbox import CWSandboxAuthenticationError, Sandbox
        try:
            Sandbox.run()
        except CWSandboxAuthenticationError as exc:
            print(exc)
        else:
            raise AssertionError("created without the right key")
    """
    assert "CWSANDBOX_API_KEY" in run(token_server, program, api_key="wrong")
    assert "CWSANDBOX_API_KEY" in run(token_server, program, api_key=None)
    run(token_server, """
        from cwsandbox import Sandbox
        with Sandbox.run() as sb:
            assert sb.exec(["echo", "ok"]).result().stdout == "ok\\n"
    """, api_key="s3cret-token")
    with pytest.raises(grpc.RpcError) as info:
        token_server.live(api_key="wrong")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_exec_timeout_kills_the_command(server):
    """A command that outlives timeout_seconds raises SandboxTimeoutError, and its process is gone
    while the sandbox lives on (a process of the same sandbox that did not time out is still seen)."""
    marker = f"{time.monotonic_ns() % 10**6}.5"
    run(server, f"""
        import os
        import time
        from cwsandbox import Sandbox, SandboxTimeoutError

        def running(command):
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                        found.append(f.read().replace(b"\\0", b" ").decode().strip())
                except OSError:
                    pass
            return command in found

        with Sandbox.run() as sb:
            witness = sb.exec(["sh", "-c", "echo up; exec sleep {marker}1"])
            assert next(iter(witness.stdout)) == "up\\n"
            deadline = time.monotonic() + 10  # "up" comes just before the shell execs sleep
            while not running("sleep {marker}1") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert running("sleep {marker}1"), "the scan does not see this sandbox's processes"
            try:
                sb.exec(["sleep", "{marker}"], timeout_seconds=0.5).result()
            except SandboxTimeoutError:
                pass
            else:
                raise AssertionError("no timeout")
            deadline = time.monotonic() + 10  # its kill follows the error within milliseconds
            while running("sleep {marker}") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not running("sleep {marker}"), "the timed-out command outlived its timeout"
            assert running("sleep {marker}1")
            assert sb.exec(["echo", "after"]).result().stdout == "after\\n"
    """)


def _spec(*tags: str, command: str = "sleep", args: tuple[str, ...] = ("infinity",)):
    return pb.SandboxSpec(tags=list(tags), containers=[pb.Container(name="main", image="python:3.11",
                                                                    command=command, args=list(args))])


def test_create_is_idempotent_by_request_id(server):
    """A create retried with its request_id returns the same sandbox; the same id with another spec is
    ALREADY_EXISTS (CWSANDBOX_REQUEST_ID_CONFLICT)."""
    request = pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=_spec("idem")), request_id="req-1")
    first = server.call("CreateSandbox", request, pb.Sandbox)
    again = server.call("CreateSandbox", request, pb.Sandbox)
    assert first.sandbox_id == again.sandbox_id and first.status.state == pb.State.Value("STATE_RUNNING")
    assert first.spec == request.sandbox.spec  # echoed as sent, image name included
    other = pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=_spec("idem", "changed")), request_id="req-1")
    with pytest.raises(grpc.RpcError) as info:
        server.call("CreateSandbox", other, pb.Sandbox)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    deleted = server.call("DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id=first.sandbox_id), pb.DeleteSandboxResponse)
    assert deleted.sandbox.status.state == pb.State.Value("STATE_TERMINATED")
    assert deleted.sandbox.status.HasField("end_time") and deleted.sandbox.status.HasField("exit_code")
    missing = server.call("DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id="sb-00000000", allow_missing=True),
                          pb.DeleteSandboxResponse)
    assert not missing.HasField("sandbox")


def test_list_filters_and_pages(server):
    """ListSandboxes: tags must all match, terminal ones only with show_terminated, a state filter, and
    page tokens that walk every match once."""
    create = [server.call("CreateSandbox", pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=_spec("page", f"n{i}"))),
                          pb.Sandbox) for i in range(5)]
    ids = {sb.sandbox_id for sb in create}
    seen, token = [], ""
    while True:
        reply = server.call("ListSandboxes", pb.ListSandboxesRequest(tags=["page"], page_size=2, page_token=token),
                            pb.ListSandboxesResponse)
        seen += [sb.sandbox_id for sb in reply.sandboxes]
        assert len(reply.sandboxes) <= 2
        if not (token := reply.next_page_token):
            break
    assert sorted(seen) == sorted(ids)
    one = server.call("ListSandboxes", pb.ListSandboxesRequest(tags=["page", "n3"]), pb.ListSandboxesResponse)
    assert [sb.sandbox_id for sb in one.sandboxes] == [create[3].sandbox_id]
    purged = server.call("PurgeSandboxes", pb.PurgeSandboxesRequest(tags=["page"]), pb.PurgeSandboxesResponse)
    assert purged.purge_count == 5
    ended = pb.ListSandboxesRequest(tags=["page"], state=pb.State.Value("STATE_TERMINATED"))
    assert len(server.call("ListSandboxes", ended, pb.ListSandboxesResponse).sandboxes) == 5
    assert not server.call("ListSandboxes", pb.ListSandboxesRequest(tags=["page"]), pb.ListSandboxesResponse).sandboxes


def test_unary_exec_and_unsupported_features(server):
    """Exec (unary) caps output and says so; a container the sandbox lacks is INVALID_ARGUMENT; direct
    connections and TTYs are UNIMPLEMENTED with a message; an unknown sandbox is NOT_FOUND with
    cwsandbox's reason."""
    sb = server.call("CreateSandbox", pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=_spec("unary"))), pb.Sandbox)
    reply = server.call("Exec", pb.ExecRequest(sandbox_id=sb.sandbox_id, command=["sh", "-c", "printf 0123456789"],
                                               max_output_bytes=4), pb.ExecResponse)
    assert (reply.stdout, reply.stdout_truncated, reply.stdout_bytes_produced, reply.exit_code) == (b"0123", True, 10, 0)
    for method, request in (("ConnectSandbox", pb.ConnectSandboxRequest(sandbox_id=sb.sandbox_id)),):
        with pytest.raises(grpc.RpcError) as info:
            server.call(method, request, pb.Sandbox)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "sandpool" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        server.call("Exec", pb.ExecRequest(sandbox_id=sb.sandbox_id, command=["true"], container="sidecar"),
                    pb.ExecResponse)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'main'" in info.value.details()
    stream = server.channel.stream_stream(f"/{SERVICE}/StreamExec", request_serializer=pb.ExecStreamRequest.SerializeToString,
                                          response_deserializer=pb.ExecStreamResponse.FromString)
    tty = pb.ExecStreamRequest(init=pb.ExecStreamInit(sandbox_id=sb.sandbox_id, command=["bash"], tty=True))
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([tty]), timeout=10, metadata=(("authorization", f"Bearer {server.token}"),)))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "TTY" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        server.call("GetSandbox", pb.GetSandboxRequest(sandbox_id="sb-00000000"), pb.Sandbox)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    details = dict(info.value.trailing_metadata())["grpc-status-details-bin"]
    assert b"CWSANDBOX_SANDBOX_NOT_FOUND" in details and b"cwsandbox.com" in details
    server.call("DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id=sb.sandbox_id, grace_period_seconds=0),
                pb.DeleteSandboxResponse)


def test_server_shutdown_stops_its_sandboxes(cwsandbox_client, tmp_path):
    """SIGTERM stops the server and every sandbox it still runs, and it exits 0."""
    server = Server(tmp_path)
    try:
        for _ in range(2):
            server.call("CreateSandbox", pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=_spec("left"))), pb.Sandbox)
        assert len(server.live()) == 2
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.stderr_path.read_text()
    leaks.check("the cwsandbox server, once stopped,")


def test_backed_by_a_sandpool_server_its_clients_see_the_sandboxes(cwsandbox_client, tmp_path):
    """With --sandpool-address the sandboxes live on that sandpool server: sandpool's own CLI lists what
    a cwsandbox client made, and stopping the cwsandbox side ends them there."""
    sandpool_server = subprocess.Popen(
        [PYTHON, "-m", "sandpool", "serve", "--listen", "127.0.0.1:0", "--record-file", str(tmp_path / "rec")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR", "SANDPOOL_IMAGE_DIR": str(tmp_path / "images"),
             "SANDPOOL_IMAGE_FALLBACK": "host"})
    try:
        ready, _, _ = select.select([sandpool_server.stdout], [], [], 30)
        line = sandpool_server.stdout.readline().decode() if ready else ""
        assert "listening on " in line, f"sandpool serve did not start: {line!r}"
        address = line.split("listening on ", 1)[1].split()[0]
        server = Server(tmp_path, "--sandpool-address", address)
        try:
            sandbox_id = run(server, """
                from cwsandbox import Sandbox
                sb = Sandbox.run(tags=["seen-by-sandpool"])
                assert sb.exec(["echo", "hi"]).result().stdout == "hi\\n"
                print(sb.sandbox_id)
            """, leave_running=True).strip()
            listed = subprocess.run([PYTHON, "-m", "sandpool", "ls", "--address", address, "--tag", "seen-by-sandpool"],
                                    capture_output=True, text=True, cwd=REPO, timeout=60)
            assert sandbox_id in listed.stdout and "running" in listed.stdout, listed
            assert cli(server, "stop", sandbox_id).returncode == 0
            assert_nothing_left(server)
        finally:
            server.stop()
        assert server.proc.returncode == 0, server.stderr_path.read_text()
    finally:
        sandpool_server.send_signal(signal.SIGTERM)
        sandpool_server.wait(30)
        sandpool_server.stdout.close()


#: Inside a sandbox: prints the /proc entry of a ``sleep 1000`` still there after 5 s, nothing once none is.
SLEEP_GONE = ("for i in $(seq 50); do found=; for f in /proc/[0-9]*/cmdline; do "
              "[ \"$(tr '\\0' ' ' < $f 2>/dev/null)\" = 'sleep 1000 ' ] && found=$f; done; "
              "[ -z \"$found\" ] && exit 0; sleep 0.1; done; echo $found")


def test_the_readme_in_asyncio_form(server):
    """cwsandbox's README async form against the listener, under asyncio.run: async with Sandbox.run,
    await exec, async for over its output, files, a session's function, and a task cancelled mid-exec
    (the client's stream ends, and the server kills the command)."""
    out = run(server, """
        import asyncio
        import cwsandbox
        from cwsandbox import Sandbox, SandboxStatus

        GONE_WITHIN_5S = %r

        async def main():
            async with Sandbox.run("sleep", "infinity") as sb:
                result = await sb.exec(["python", "-c", "print(2 + 2)"])
                assert result.stdout == "4\\n", result
                proc = sb.exec(["sh", "-c", "echo a; echo b"])
                chunks = [chunk async for chunk in proc.stdout]
                assert "".join(chunks) == "a\\nb\\n", chunks
                await sb.write_file("/tmp/f", b"data")
                assert await sb.read_file("/tmp/f") == b"data"
                try:
                    await asyncio.wait_for(sb.exec(["sleep", "1000"]), 0.5)
                except asyncio.TimeoutError:
                    pass
                assert (await sb.exec(["echo", "after"])).stdout == "after\\n"
                left = await sb.exec(["sh", "-c", GONE_WITHIN_5S])
                assert left.stdout == "", f"the cancelled command still runs: {left.stdout}"
            assert sb.status == SandboxStatus.TERMINATED, sb.status
            async with cwsandbox.Session() as session:
                @session.function()
                def square(x):
                    return x * x
                assert await square.remote(7) == 49
            print("OK")

        asyncio.run(main())
    """ % SLEEP_GONE)
    assert out == "OK\n"
    assert_nothing_left(server)

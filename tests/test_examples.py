"""Every script in examples/ runs as its own process, exits 0, prints its key line, leaves nothing.

The scripts inherit SANDPOOL_STATE_DIR from conftest, so their sandboxes live under the test run's
state directory, where ``sandpool.testing.leftovers`` looks once each script has exited.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from sandpool import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.py"))
                  + glob.glob(os.path.join(REPO, "examples", "async", "*.py")))


def _name(path: str) -> str:
    """The example's path under examples/: 'basic_usage.py', 'async/readme_quickstart.py'."""
    return os.path.relpath(path, os.path.join(REPO, "examples"))


#: A line (or part of one) each example must print; a new example must add its own here.
KEY_LINES = {
    "async/cancel_and_timeout.py": "task cancelled; the sandbox still serves: yes",
    "async/readme_quickstart.py": "2 + 2 = 4",
    "async/remote_functions.py": "cubes: [0, 1, 8, 27, 64, 125]",
    "async/session_gather.py": "after the block: terminated, sandbox_count=0",
    "async/streams_and_logs.py": "streamed back: 16 MiB",
    "adopt_sandboxes.py": "late ones after that session closed: ['terminated', 'terminated']",
    "async_basic_usage.py": "after the block: terminated, sandbox_count=0",
    "basic_usage.py": "hello from a sandbox",
    "bench_harness.py": "| true | 6 |",
    "demo.py": "664,579   (correct)",
    "error_handling.py": "every sandbox was stopped: ['terminated', 'terminated', 'terminated']",
    "function_retries.py": "flaky() -> ok after 3 attempts",
    "manual_close.py": "statuses after close: ['terminated', 'terminated', 'terminated']",
    "overriding_defaults.py": "inside the override sandbox: STAGE=test REGION=local data limit 524288 KiB",
    "parallel_map.py": "primes below 50,000: 5,133",
    "pool.py": "distinct sandboxes: 5",
    "sandbox_count.py": "after close: 0",
    "testing_with_fake_runtime.py": "3 tests passed on FakeRuntime",
    "standalone_run.py": "after the with block: terminated, returncode 143",
    "start_and_wait.py": "all running: True",
}


def test_every_example_has_a_key_line():
    """Each script in examples/ is listed in KEY_LINES, and each entry names an existing script."""
    assert sorted(KEY_LINES) == sorted(_name(path) for path in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=_name)
def test_example_runs_and_leaves_nothing(path, state_dir):
    """The example exits 0, prints its key line and nothing on stderr, and leaves no sandbox
    process or directory behind."""
    assert os.environ.get("SANDPOOL_STATE_DIR") == state_dir
    proc = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=60, cwd=REPO)
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert KEY_LINES[_name(path)] in proc.stdout, output
    assert proc.stderr == "", output
    report = testing.wait_for_no_leftovers(state_dir, timeout=5.0)
    assert not report, f"{_name(path)} left {report}\n{output}"

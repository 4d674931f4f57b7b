"""sandpool is typed: it ships py.typed, user programs type-check under ``mypy --strict`` (and
pyright's strict mode) with the signatures of their remote functions kept, deliberate type errors
are reported, and the listed parts of the package itself stay clean under ``mypy --strict`` and
pyright.

mypy checks the user programs against sandpool as installed (a ``build_py`` of this checkout put
on the path as site-packages), so what is tested is what a user's type checker sees: the package's
own annotations behind its py.typed marker, with errors inside the package not reported.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from sandpool import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPED = os.path.join(REPO, "examples", "typed")
EXAMPLES = sorted(glob.glob(os.path.join(TYPED, "*.py")))
NEGATIVE = os.path.join(TYPED, "negative", "wrong_types.py")

#: What ``make typecheck`` checks: all of sandpool/ is clean (0 errors) under both ``mypy --strict``
#: and pyright (in the project's configuration).
CLEAN_PATHS = ["sandpool"]

#: The line each typed example prints last.
KEY_LINES = {"sync_usage.py": "typed sync ok 0", "trio_usage.py": "typed trio ok",
             "asyncio_usage.py": "typed asyncio ok"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """sandpool and _sandpool_agent as a wheel would install them (setuptools' build_py, which
    copies the package data pyproject.toml names): the directory to use as site-packages."""
    lib = tmp_path_factory.mktemp("site") / "lib"
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                    "build", "--build-base", str(build), "build_py", "--build-lib", str(lib)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return str(lib)


def _mypy(paths, site, cwd, *extra):
    """Run mypy --strict on ``paths`` from ``cwd`` with ``site`` as the only place sandpool is
    found (mypy asks the interpreter for its sys.path, PYTHONPATH included); (exit code, output)."""
    env = dict(os.environ, PYTHONPATH=site)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", f"--cache-dir={os.devnull}", "--show-error-codes",
                           "--no-error-summary", *extra, *paths],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _copy(paths, dest):
    """Copies of ``paths`` in ``dest`` (so that mypy cannot find sandpool next to them)."""
    for path in paths:
        shutil.copy(path, dest)
    return sorted(os.path.basename(p) for p in paths)


def _marked_errors():
    """{(line number, mypy error code)} of the lines of the negative file marked ``# E: code``."""
    with open(NEGATIVE) as f:
        return {(number, match.group(1)) for number, line in enumerate(f, 1)
                if (match := re.search(r"# E: ([a-z-]+)$", line))}


def test_package_data_ships_py_typed(installed):
    """Both packages carry a py.typed marker as installed."""
    for package in ("sandpool", "_sandpool_agent"):
        assert os.path.isfile(os.path.join(installed, package, "py.typed")), package


def test_typed_examples_pass_mypy_strict(installed, tmp_path):
    """The typed examples (sync, trio, asyncio) have no error under mypy --strict; their
    ``assert_type`` lines fail if a remote function's signature or a result type is lost."""
    assert sorted(os.path.basename(p) for p in EXAMPLES) == sorted(KEY_LINES)
    names = _copy(EXAMPLES, tmp_path)
    code, output = _mypy(names, installed, tmp_path)
    assert (code, output) == (0, ""), output


def test_testing_names_are_exported(installed, tmp_path):
    """``sandpool.testing``'s documented names import under mypy --strict, which takes a module's
    imported names as its own only when it says so (``__all__``): the fakes come from elsewhere."""
    (tmp_path / "uses_testing.py").write_text(
        "from sandpool.testing import FakeCall, FakeCommand, FakeExec, FakeRuntime, FakeSandbox, Leftovers, leftovers\n"
        "runtime: FakeRuntime | None = None\n"
        "scripted: tuple[type[FakeCall], type[FakeCommand], type[FakeExec], type[FakeSandbox]] | None = None\n"
        "report: Leftovers = leftovers('/nonexistent')\n")
    code, output = _mypy(["uses_testing.py"], installed, tmp_path)
    assert (code, output) == (0, ""), output


def test_without_py_typed_mypy_sees_no_types(installed, tmp_path):
    """The control: the same examples against a copy without sandpool's py.typed fail, since
    mypy then refuses to read the package (so the test above depends on the marker)."""
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    os.remove(site / "sandpool" / "py.typed")
    work = tmp_path / "work"
    work.mkdir()
    code, output = _mypy(_copy(EXAMPLES, work), str(site), work)
    assert code == 1, output
    assert "missing library stubs or py.typed marker" in output, output


def test_negative_file_reports_each_deliberate_error(installed, tmp_path):
    """Each line of the negative file marked ``# E: code`` (a wrong argument type to a remote
    function, a ProcessResult used as a str, ...) is reported with that code, and nothing else."""
    expected = _marked_errors()
    assert len(expected) >= 5
    names = _copy([NEGATIVE], tmp_path)
    code, output = _mypy(names, installed, tmp_path)
    reported = {(int(m.group(1)), m.group(2))
                for m in re.finditer(r"^wrong_types\.py:(\d+): error: .*\[([a-z-]+)\]$", output, re.M)}
    assert code == 1, output
    assert reported == expected, output


def test_clean_parts_pass_mypy_strict():
    """The listed parts of sandpool have no error under mypy --strict (the modules they import are
    read for their types, their own errors not reported: they are not listed yet)."""
    code, output = _mypy(CLEAN_PATHS, REPO, REPO, "--follow-imports=silent")
    assert (code, output) == (0, ""), output


def test_clean_parts_pass_pyright():
    """... and none under pyright, in the project's configuration (pyproject.toml: standard mode),
    on files of the listed parts only."""
    assert all(os.path.exists(os.path.join(REPO, path)) for path in CLEAN_PATHS)
    proc = subprocess.run([sys.executable, "-m", "pyright", "--pythonpath", sys.executable, *CLEAN_PATHS],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and re.search(r"^0 errors, ", output, re.M), output


def _pyright(paths, site, cwd, mode):
    """Run pyright (``mode``: "strict" or "basic") on ``paths`` from ``cwd``, sandpool found in
    ``site`` only (pyright asks the interpreter for its sys.path); (exit code, output)."""
    with open(os.path.join(cwd, "pyrightconfig.json"), "w") as f:
        json.dump({"typeCheckingMode": mode}, f)
    env = dict(os.environ, PYTHONPATH=site)
    proc = subprocess.run([sys.executable, "-m", "pyright", "--pythonpath", sys.executable, *paths],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_typed_examples_pass_pyright_strict(installed, tmp_path):
    """pyright (strict) agrees: no error in the typed examples ..."""
    code, output = _pyright(_copy(EXAMPLES, tmp_path), installed, tmp_path, "strict")
    assert code == 0 and "0 errors" in output, output


def test_pyright_reports_the_deliberate_errors(installed, tmp_path):
    """... and an error on each marked line of the negative file, and on no other line (in basic
    mode: strict mode adds follow-on errors about the unknown types the errors leave)."""
    expected = {number for number, _code in _marked_errors()}
    code, output = _pyright(_copy([NEGATIVE], tmp_path), installed, tmp_path, "basic")
    reported = {int(m.group(1)) for m in re.finditer(r"wrong_types\.py:(\d+):\d+ - error", output)}
    assert code == 1, output
    assert reported == expected, output


@pytest.mark.parametrize("name", sorted(KEY_LINES))
def test_typed_example_runs_and_leaves_nothing(name, state_dir):
    """Each typed example is a working program: it exits 0, prints its last line, and leaves no
    sandbox behind."""
    proc = subprocess.run([sys.executable, os.path.join(TYPED, name)], capture_output=True, text=True,
                          timeout=90, cwd=REPO)
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert KEY_LINES[name] in proc.stdout, output
    report = testing.wait_for_no_leftovers(state_dir, timeout=5.0)
    assert not report, f"{name} left {report}\n{output}"

"""The sandbox side stands alone: imported the way the template imports it (a cold ``python -I -S``
with only the package's directory and the client's ``sys.path`` added), every module of
``_sandpool_agent`` pulls in neither trio nor grpc nor any part of sandpool. One careless import
would add ~150 ms to every sandbox start."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import _sandpool_agent

PARENT = os.path.dirname(os.path.dirname(os.path.abspath(_sandpool_agent.__file__)))
#: Every module of the sandbox side: the ones the template imports up front, the ones it imports
#: when a call or a file operation arrives, and the confinement it applies.
AGENT_SIDE = sorted(m.name for m in pkgutil.walk_packages(_sandpool_agent.__path__, "_sandpool_agent."))
PROBE = """
import importlib, json, sys
sys.path[:0] = [sys.argv[1]] + sys.argv[2].split(chr(10))
for name in json.loads(sys.argv[3]):
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def test_agent_side_imports_neither_trio_nor_grpc_nor_sandpool():
    """Every module imports in a cold isolated interpreter, and afterwards sys.modules holds no trio,
    grpc, sniffio, outcome or anyio, and no sandpool module at all."""
    paths = "\n".join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, PARENT, paths, json.dumps(AGENT_SIDE)],
                         capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(out.stdout)
    assert "_sandpool_agent.template" in loaded and "_sandpool_agent.agent" in loaded
    assert "_sandpool_agent.confine.supervisor" in loaded
    forbidden = [m for m in loaded if m.split(".")[0] in ("trio", "grpc", "sniffio", "outcome", "anyio", "sandpool")]
    assert forbidden == []


def test_the_probe_sees_a_forbidden_import():
    """The probe can fail: a module list that includes a client module shows trio and sandpool."""
    paths = "\n".join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, PARENT, paths,
                          json.dumps(["_sandpool_agent.agent", "sandpool._core.portal"])],
                         capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(out.stdout)
    assert "trio" in loaded and "sandpool" in loaded


def test_sandpool_reexports_the_wire_error():
    """The wire format's ProtocolError is sandpool's, and the whole tree hangs from the same root."""
    import sandpool
    from _sandpool_agent import errors

    assert sandpool.ProtocolError is errors.ProtocolError
    assert issubclass(sandpool.SandboxTimeoutError, errors.SandpoolError)
    assert sandpool.SandpoolError is errors.SandpoolError is sandpool.CWSandboxError

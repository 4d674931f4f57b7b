"""The code that runs inside a sandbox stands alone: imported the way the template imports it (a
cold ``python -I -S`` with a stub ``sandpool`` package), it pulls in neither trio nor grpc nor
sandpool's client side. One careless import would add ~150 ms to every sandbox start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import sandpool

PACKAGE = os.path.dirname(os.path.abspath(sandpool.__file__))
#: Every module of the agent side, the ones the template imports up front and the ones it imports
#: when a call or a file operation arrives.
AGENT_SIDE = [f"sandpool._agent.{os.path.splitext(name)[0]}" for name in sorted(os.listdir(os.path.join(PACKAGE, "_agent")))
              if name.endswith(".py") and name != "__init__.py"]
PROBE = """
import importlib, json, sys, types
sys.path[:0] = sys.argv[2].split(chr(10))
stub = types.ModuleType("sandpool"); stub.__path__ = [sys.argv[1]]; sys.modules["sandpool"] = stub
for name in json.loads(sys.argv[3]):
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def test_agent_side_imports_neither_trio_nor_grpc_nor_the_client():
    """Every agent module imports in a cold isolated interpreter, and afterwards sys.modules holds
    no trio, grpc, sniffio or outcome, and no sandpool module outside the agent side."""
    paths = "\n".join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, os.path.dirname(PACKAGE) + "/sandpool", paths,
                          json.dumps(AGENT_SIDE)], capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(out.stdout)
    assert "sandpool._agent.template" in loaded and "sandpool._agent.agent" in loaded
    forbidden = [m for m in loaded if m.split(".")[0] in ("trio", "grpc", "sniffio", "outcome", "anyio")]
    assert forbidden == []
    client_side = [m for m in loaded if m.startswith("sandpool.")
                   and not m.startswith(("sandpool._agent", "sandpool._isolation", "sandpool._wire", "sandpool._errors"))]
    assert client_side == []

"""An exception raised in a remote function satisfies both habits, under each host and runtime: it
is caught by ``except ValueError`` (its own type) and by ``except SandboxExecutionError``
(cwsandbox's), carries cwsandbox's attributes (``reason``, ``metadata``, ``retry_delay``), and one
whose type cannot be rebuilt here is a ``RemoteError``, also a ``SandboxExecutionError``."""

from __future__ import annotations

import pytest

from sandpool import RemoteError, SandboxExecutionError

from host_helpers import HOSTS
from service_helpers import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve-errors"))) as srv:
        yield srv


@pytest.fixture(params=["local", "remote"])
def where(request):
    """Session options for the local runtime, or for a sandpool server's (started before the body)."""
    return {} if request.param == "local" else {"address": request.getfixturevalue("server").address}


@pytest.mark.parametrize("host", list(HOSTS))
def test_a_remote_value_error_is_caught_both_ways(host, where):
    async def body(h):
        async with h.session(**where) as s:
            @s.function()
            def fails(kind):
                class Unbuildable(Exception):  # defined here: pickled by value, not by this module's name
                    def __init__(self, a, b):  # rebuilding it from its args fails: it gets one
                        super().__init__(f"{a}-{b}")

                if kind == "value":
                    raise ValueError("bad input 42")
                raise Unbuildable("x", "y")

            for wanted in (ValueError, SandboxExecutionError):
                with pytest.raises(wanted, match="bad input 42") as info:
                    await h.wait(fails.remote("value"))
                err = info.value
                assert isinstance(err, ValueError) and isinstance(err, SandboxExecutionError)
                assert type(err).__name__ == "ValueError" and err.args == ("bad input 42",)
                assert err.metadata == {} and err.retry_delay is None and hasattr(err, "reason")
            with pytest.raises(SandboxExecutionError) as info:
                await h.wait(fails.remote("other"))
            assert isinstance(info.value, RemoteError) and info.value.type_name.endswith("Unbuildable")

    HOSTS[host].run(body)

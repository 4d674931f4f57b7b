"""The public surface is pinned: ``sandpool.__all__`` is cwsandbox's names plus these of sandpool's
own, no more and no fewer. Adding or removing a public name means editing this list on purpose."""

from __future__ import annotations

import cwsandbox

import sandpool

#: What sandpool exports beyond cwsandbox's ``__all__``.
SANDPOOL_OWN = {
    "ActorClass", "ActorDiedError", "ActorHandle", "enter", "kill",  # actors (docs/actors.md)
    "LocalRuntime", "NotSupportedLocallyError", "OperationCancelled", "PoolStatistics",
    "ProfileNotFoundError", "ProtocolError", "RemoteError", "ResultStream", "Retries", "Runtime",
    "SandboxDiedError", "SandboxSpec", "SandpoolError", "SerializationError", "SlurmRuntime",
    "as_completed", "gather",
}


def test_all_is_cwsandboxs_names_plus_sandpools_own():
    exported = set(sandpool.__all__)
    assert exported - set(cwsandbox.__all__) == SANDPOOL_OWN
    assert set(cwsandbox.__all__) - exported == set()
    assert len(sandpool.__all__) == len(exported)


def test_every_public_name_is_defined_in_sandpool_not_borrowed_from_cwsandbox():
    """Each exported class or function is sandpool's own object, never cwsandbox's re-exported."""
    borrowed = [name for name in sandpool.__all__
                if getattr(getattr(sandpool, name), "__module__", "").split(".")[0] == "cwsandbox"]
    assert borrowed == []


def test_private_modules_stay_private():
    """No public attribute of the package is a private module or a layer package."""
    import types

    public_modules = [name for name in dir(sandpool) if not name.startswith("_")
                      and isinstance(getattr(sandpool, name), types.ModuleType)]
    assert set(public_modules) <= {"exceptions", "testing"}

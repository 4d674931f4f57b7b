"""The containers of a sandbox the cwsandbox service runs: which one a data-plane call names, and
their status rows. A spec with several containers runs as a sandpool pod (``sandpool._pods``);
``ExecRequest.container`` and the file calls' ``container`` pick one of its containers."""

from __future__ import annotations

from typing import Any

from ._errors import invalid
from ._spec import PRIMARY_CONTAINER, primary


def names(spec: Any) -> list[str]:
    """The containers' names, the primary's first ("main" when it has none)."""
    first = primary(spec)
    if first is None:
        return [PRIMARY_CONTAINER]
    return [first.name or PRIMARY_CONTAINER] + [c.name for c in spec.containers if c is not first]


def container(spec: Any, name: str) -> str | None:
    """The sandpool ``container=`` for the container ``name`` asks for (None: the primary);
    RpcFailure INVALID_ARGUMENT, naming the containers, for a name the sandbox lacks."""
    known = names(spec)
    if name in ("", PRIMARY_CONTAINER, known[0]):
        return None
    if name not in known[1:]:
        raise invalid("container", f"container {name!r} does not exist; this sandbox's containers are "
                                   f"{', '.join(map(repr, known))} ('' means the primary)")
    return name


class InContainer:
    """A sandbox as one of its containers, for the data-plane helpers (``_exec``, ``_files``): their
    ``exec``, ``read_file`` and ``write_file`` calls go to that container."""

    def __init__(self, sandbox: Any, name: str | None) -> None:
        self.sandbox, self.name = sandbox, name

    @property
    def isolation(self) -> str | None:
        return self.sandbox.isolation  # type: ignore[no-any-return]

    def exec(self, command: Any, **options: Any) -> Any:
        return self.sandbox.exec(command, container=self.name, **options)

    def read_file(self, path: str, **options: Any) -> Any:
        return self.sandbox.read_file(path, container=self.name, **options)

    def write_file(self, path: str, content: bytes, **options: Any) -> Any:
        return self.sandbox.write_file(path, content, container=self.name, **options)

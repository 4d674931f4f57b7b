"""The root of sandpool's exception tree and the wire's own error, stdlib only.

The sandbox side raises ``ProtocolError`` for a malformed frame, and the client raises the same
class, so the root and the branch down to it live here, below both. ``sandpool._errors`` builds
the rest of the tree on them and sandpool re-exports them under the same names.

Every class takes a message plus keyword-only extras (declared in ``_extras``, defaulting to
None) and keeps them as attributes. ``str(e)`` is the message. Exceptions pickle with their
extras intact, because they cross the agent's wire and process boundaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import timedelta

__all__ = ["CWSandboxError", "ProtocolError", "SandboxError", "SandboxProtocolError", "SandpoolError"]


def _rebuild(cls: type[SandpoolError], message: str, extras: dict[str, object]) -> SandpoolError:
    """Unpickle helper: call the constructor again, so keyword-only extras survive."""
    return cls(message, **extras)


class SandpoolError(Exception):
    """Base of every sandpool error (``CWSandboxError`` is the same class).

    Args:
        message: the human-readable text; ``str(e)`` returns it.
        **extras: the keyword-only attributes the class declares (see ``extra_names()``);
            each one not given is None. An undeclared name raises TypeError. Every class has
            cwsandbox's three: ``reason`` (a machine-readable cause such as
            ``CWSANDBOX_FILE_NOT_FOUND``), ``metadata`` (a dict of str, empty when not given)
            and ``retry_delay`` (a ``datetime.timedelta`` hint, or None).
    """

    _extras: tuple[str, ...] = ("reason", "metadata", "retry_delay")
    _all_extras: tuple[str, ...] = _extras
    reason: str | None  # cwsandbox's three extras, set in __init__ (declared for type checkers)
    metadata: dict[str, str]
    retry_delay: timedelta | None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        names: dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            names.update(dict.fromkeys(vars(klass).get("_extras", ())))
        cls._all_extras = tuple(names)

    def __init__(self, message: str = "", **extras: object) -> None:
        super().__init__(message)
        allowed = self._all_extras
        unknown = [name for name in extras if name not in allowed]
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown keyword argument {unknown[0]!r}; "
                f"valid keywords: {', '.join(allowed) or '(none)'}"
            )
        for name in allowed:
            setattr(self, name, extras.get(name))
        self.metadata = dict(self.metadata or {})

    @classmethod
    def extra_names(cls) -> tuple[str, ...]:
        """The keyword-only attributes of this class, base classes' first."""
        return cls._all_extras

    @property
    def message(self) -> str:
        """The message given to the constructor (what ``str(e)`` returns)."""
        return str(self.args[0]) if self.args else ""

    def extras(self) -> dict[str, object]:
        """The keyword-only attributes and their current values."""
        return {name: getattr(self, name, None) for name in self._all_extras}

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuild through the constructor, not BaseException's cls(*args): a subclass that
        # requires a keyword-only extra could not be called with the message alone. The third
        # item keeps any other instance state, such as __notes__ from add_note().
        extras = self.extras()
        state = {k: v for k, v in self.__dict__.items() if k not in extras}
        return (_rebuild, (type(self), self.message, extras), state or None)

    def __repr__(self) -> str:
        shown = [repr(self.message)]
        shown += [f"{k}={v!r}" for k, v in self.extras().items() if v is not None and v != {} and v != ()]
        return f"{type(self).__name__}({', '.join(shown)})"


CWSandboxError = SandpoolError
"""cwsandbox's name for the base class; the same object, so either can be caught."""


class SandboxError(SandpoolError):
    """Base for failures of a sandbox operation; ``sandbox_id`` says which sandbox."""

    _extras: tuple[str, ...] = ("sandbox_id",)
    sandbox_id: str | None  # set in __init__ (declared for type checkers)


class SandboxProtocolError(SandboxError):
    """An answer could not be decoded (cwsandbox's name); sandpool raises its ProtocolError."""


class ProtocolError(SandboxProtocolError):
    """A wire frame was malformed, of an unknown kind or out of order.

    ``frame`` is the offending frame (or a repr-able summary of it), or None when nothing
    could be decoded. This is a bug or a version mismatch between client and agent.
    """

    _extras: tuple[str, ...] = ("frame",)

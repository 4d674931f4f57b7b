"""Every sandpool exception, under cwsandbox's module name: ``from sandpool.exceptions import ...``.

The same classes as ``sandpool.<Name>`` (this module only re-exports), in cwsandbox 1.22's
hierarchy with its attributes (``reason``, ``metadata``, ``retry_delay`` on all of them), plus
sandpool's own (``SandboxDiedError``, ``RemoteError``, ``NotSupportedLocallyError``, ...).
"""

from . import _errors, _errors_cw
from ._errors import *  # noqa: F403
from ._errors_cw import *  # noqa: F403

# extended in the form type checkers read (the two lists share no name)
__all__: list[str] = []
__all__ += _errors.__all__
__all__ += _errors_cw.__all__

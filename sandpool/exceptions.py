"""Every sandpool exception, under cwsandbox's module name: ``from sandpool.exceptions import ...``.

The same classes as ``sandpool.<Name>`` (this module only re-exports), in cwsandbox 1.22's
hierarchy with its attributes (``reason``, ``metadata``, ``retry_delay`` on all of them), plus
sandpool's own (``SandboxDiedError``, ``RemoteError``, ``NotSupportedLocallyError``, ...).
"""

from ._errors import *  # noqa: F403
from ._errors import __all__ as _core
from ._errors_cw import *  # noqa: F403
from ._errors_cw import __all__ as _cloud

__all__ = sorted({*_core, *_cloud})

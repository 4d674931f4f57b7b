"""The message types of cwsandbox's wire protocol, built from the vendored descriptors.

``pb`` holds every message and enum of ``coreweave.sandbox.v1`` by its short name
(``pb.CreateSandboxRequest``, ``pb.State.Value("STATE_RUNNING")``); ``rpc`` holds the
``google.rpc`` error details (``Status``, ``ErrorInfo``, ``RetryInfo``, ``BadRequest``) and ``Any``.
They live in a private descriptor pool, so they never clash with the client's own generated modules
when both are imported in one process. Needs only the protobuf runtime (``sandpool[cwsandbox]``).
"""

from __future__ import annotations

import base64
import types
import zlib
from typing import Any

try:
    from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory
    from google.protobuf import timestamp_pb2
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the cwsandbox service needs protobuf; install it with: pip install 'sandpool[cwsandbox]'") \
        from exc

from . import _descriptors

#: A message (or enum value holder) of the protocol: its class is made at run time from the vendored
#: descriptors, so it has no static type; fields are checked where a request is read.
Message = Any

SERVICE = "coreweave.sandbox.v1.SandboxService"
PACKAGE = "coreweave.sandbox.v1"


def _load() -> tuple[descriptor_pool.DescriptorPool, list[Any]]:
    pool = descriptor_pool.DescriptorPool()
    for builtin in (descriptor_pb2, timestamp_pb2, any_pb2, duration_pb2):
        pool.AddSerializedFile(builtin.DESCRIPTOR.serialized_pb)
    fds = descriptor_pb2.FileDescriptorSet.FromString(zlib.decompress(base64.b64decode(_descriptors.DESCRIPTOR_SET)))
    for file in fds.file:
        pool.AddSerializedFile(file.SerializeToString())
    return pool, [pool.FindFileByName(file.name) for file in fds.file]


def _namespace(files: list[Any], package: str) -> types.SimpleNamespace:
    names: dict[str, object] = {}
    for file in files:
        if file.package != package:
            continue
        for name, message in file.message_types_by_name.items():
            names[name] = message_factory.GetMessageClass(message)
        for name, enum in file.enum_types_by_name.items():
            names[name] = EnumTypeWrapper(enum)
    return types.SimpleNamespace(**names)


POOL, _FILES = _load()
pb = _namespace(_FILES, PACKAGE)
rpc = _namespace(_FILES, "google.rpc")
rpc.Any = message_factory.GetMessageClass(POOL.FindMessageTypeByName("google.protobuf.Any"))
Timestamp = message_factory.GetMessageClass(POOL.FindMessageTypeByName("google.protobuf.Timestamp"))
SERVICE_DESCRIPTOR = POOL.FindServiceByName(SERVICE)


def timestamp(seconds: float | None) -> Message:
    """A Timestamp for a Unix time in seconds, or None."""
    if seconds is None:
        return None
    whole = int(seconds)
    return Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))

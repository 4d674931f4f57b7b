"""Plain data across the trust boundary: the codec of remote functions' results and exceptions.

A sandbox's results and exceptions come back in this format, never as a pickle, so that nothing a
sandbox sends can run code in the client: decoding only ever builds plain values. Both sides import
this module (the call worker to encode, the client to decode); it needs only the stdlib and
msgpack, and numpy only when an array is actually met (``sys.modules`` on the encoding side, where
an array's presence proves numpy is loaded; a lazy import on the decoding side).

Plain data is, by exact type: None, bool, int (any size), float, complex, str, bytes (bytearray
and memoryview come back as bytes), list, tuple, dict (keys of these types), set, frozenset, and
numpy arrays and scalars of any dtype without Python objects (as dtype, shape and raw buffer).
Subclasses (an IntEnum, a namedtuple, an OrderedDict) are not plain: ``NotPlain`` names the type.

The payload is one msgpack value, packed and parsed by msgpack's C code in one pass. What msgpack
lacks is a msgpack array whose first item is a marker (an empty extension value): a tuple is
``[TUPLE, *items]``, likewise sets, frozensets and arrays (``[ARRAY, dtype, shape, order,
scalar, bytes]``); an int beyond 64 bits and a complex are extension values of their own. An array
of at least ``OOB_BYTES``, and a result that is one large blob of bytes, go out of band: the
payload then starts with the byte 0xC1 (never the first byte of msgpack), a 4-byte length of the
msgpack head, the head, and the raw bytes, which the encoder hands over uncopied
(``encode_parts``) and ``decode_file`` reads straight into the objects that hold them.

Decoding is bounded: nesting (about 1000 levels, msgpack's own limits on both sides),
integer sizes, array ranks and sizes (checked against the bytes present), and the number of
containers (one per ``CONTAINER_BYTES`` of a large payload), so a decoded value takes at most
about 32 times its payload's size in memory. A marker anywhere but first in an array, and every
other inconsistency, is ``Malformed``, a ValueError naming what is wrong.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from typing import Any

import msgpack

__all__ = ["OOB_BYTES", "PLAIN_TYPES", "Malformed", "NeedsNumpy", "NotPlain", "decode", "decode_file",
           "describe_exception", "encode", "encode_parts"]

#: Arrays at least this large travel out of band (uncopied by the encoder).
OOB_BYTES = 64 * 1024
#: Largest int, in bytes of two's complement (8 MiB of digits).
MAX_INT_BYTES = 1 << 20
#: Highest rank of an array (numpy's own limit is 64).
MAX_NDIM = 64
#: A payload larger than this may hold at most one list, dict, tuple or set per CONTAINER_BYTES.
COUNT_ABOVE_BYTES = 1024 * 1024
CONTAINER_BYTES = 2

#: What counts as plain data, for messages.
PLAIN_TYPES = "None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, numpy arrays"
#: Largest plain description of an exception; past it, its args and attributes are left out.
MAX_EXCEPTION_BYTES = 1024 * 1024

# extension codes: markers (empty data) first in an array, then values of their own
_TUPLE, _SET, _FROZENSET, _ARRAY, _OOB_ARRAY, _OOB_BYTES, _BIGINT, _COMPLEX = range(1, 9)
_MARKERS = {code: msgpack.ExtType(code, b"") for code in (_TUPLE, _SET, _FROZENSET, _ARRAY, _OOB_ARRAY, _OOB_BYTES)}
_OOB_MARK = 0xC1
_HEAD_LEN = struct.Struct(">BI")
_COMPLEX_PAIR = struct.Struct("<dd")
_SCALARS = frozenset({type(None), bool, int, float})
#: First bytes of msgpack values that hold no array, map or extension value (msgpack's spec).
_SCALAR_FIRST = bytes(int(b <= 0x7F or 0xA0 <= b <= 0xBF or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3)
                          or 0xC4 <= b <= 0xC6 or 0xCA <= b <= 0xD3 or 0xD9 <= b <= 0xDB) for b in range(256))


class NotPlain(TypeError):
    """A value is not plain data (encoding side); the message names its type."""


class Malformed(ValueError):
    """A payload does not decode as plain data (decoding side); the message says what is wrong."""


class NeedsNumpy(Malformed):
    """The payload holds a numpy array, and numpy cannot be imported on this side."""


def _type_name(obj: object) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class _Encoder:
    """Packs one value at a time with one msgpack Packer, kept for the next value (making a Packer
    costs more than packing a small value). ``buffers`` collects the out-of-band arrays."""

    __slots__ = ("buffers", "size", "packer")

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self.size = 0  # bytes of out-of-band buffers so far
        self.packer = msgpack.Packer(default=self.default, strict_types=True, use_bin_type=True)

    def pack(self, obj: object) -> bytes:
        try:
            return self.packer.pack(obj)
        except BaseException as exc:
            self.packer.reset()
            if isinstance(exc, ValueError):  # msgpack's nesting limit, a str with surrogates
                what = "nested too deep (about 1000 levels at most)" if "recursion" in str(exc) else \
                    f"{type(exc).__name__}: {exc}"
                raise NotPlain(f"not encodable as plain data: {what}") from exc
            raise

    def default(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is tuple:
            return [_MARKERS[_TUPLE], *obj]
        if cls is set or cls is frozenset:
            return [_MARKERS[_SET if cls is set else _FROZENSET], *obj]
        if cls is int:  # beyond msgpack's 64 bits
            data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            if len(data) > MAX_INT_BYTES:
                raise NotPlain(f"int of {len(data)} bytes is above the {MAX_INT_BYTES}-byte limit of plain data")
            return msgpack.ExtType(_BIGINT, data)
        if cls is complex:
            return msgpack.ExtType(_COMPLEX, _COMPLEX_PAIR.pack(obj.real, obj.imag))
        np = sys.modules.get("numpy")
        if np is not None and (cls is np.ndarray or isinstance(obj, np.generic)):
            return self._array(obj, np)
        raise NotPlain(f"{_type_name(obj)} object is not plain data")

    def _array(self, obj: Any, np: Any) -> list:
        scalar = isinstance(obj, np.generic)
        array = np.asarray(obj) if scalar else obj
        dtype = array.dtype
        if dtype.hasobject:
            raise NotPlain(f"numpy {'scalar' if scalar else 'array'} of dtype {dtype} holds Python objects, "
                           "which are not plain data")
        if array.flags.c_contiguous:
            order = "C"
        elif array.flags.f_contiguous:
            order = "F"
        else:
            array, order = np.ascontiguousarray(array), "C"
        raw = array.reshape(-1, order=order).view(np.uint8)  # a view: both orders are contiguous
        described = dtype.str if dtype.fields is None else dtype.descr
        head = [described, list(array.shape), order, scalar]
        if raw.nbytes >= OOB_BYTES:
            self.buffers.append(memoryview(raw))
            self.size += raw.nbytes
            return [_MARKERS[_OOB_ARRAY], *head, self.size - raw.nbytes, raw.nbytes]
        return [_MARKERS[_ARRAY], *head, raw.tobytes()]


_packer = msgpack.Packer(use_bin_type=True)  # for native values only: no callback, so never re-entered
_shared_encoder = _Encoder()
_shared_lock = threading.Lock()  # held while the shared encoder is in use; a busy one is not waited for


def encode_parts(value: object) -> list[Any]:
    """Encode ``value`` as a list of bytes-like parts to write in order (arrays' buffers uncopied).

    Raises NotPlain naming the first value that is not plain data.
    """
    cls = type(value)
    if cls in _SCALARS or ((cls is str or cls is bytes) and len(value) < OOB_BYTES):  # type: ignore[arg-type]
        try:  # the common small result (large ones would leave the shared packer's buffer grown)
            return [_packer.pack(value)]
        except (OverflowError, ValueError):
            _packer.reset()  # an int beyond 64 bits, a str with surrogates: the general path says so
    elif (cls is bytes or cls is bytearray or cls is memoryview) and len(value) >= OOB_BYTES:  # type: ignore[arg-type]
        buffer = memoryview(value).cast("B")  # a large blob: out of band, uncopied
        head = msgpack.packb([_MARKERS[_OOB_BYTES], 0, buffer.nbytes])
        return [_HEAD_LEN.pack(_OOB_MARK, len(head)), head, buffer]
    shared = _shared_lock.acquire(blocking=False)
    encoder, head = _shared_encoder if shared else _Encoder(), b""
    try:
        head = encoder.pack(value)
        buffers = encoder.buffers
    finally:
        if shared:
            encoder.buffers, encoder.size = [], 0
            if len(head) >= OOB_BYTES:  # its buffer grew: let it go
                encoder.packer = msgpack.Packer(default=encoder.default, strict_types=True, use_bin_type=True)
            _shared_lock.release()
    if not buffers:
        return [head]
    return [_HEAD_LEN.pack(_OOB_MARK, len(head)), head, *buffers]


def encode(value: object) -> bytes:
    """``encode_parts`` joined into one bytes object."""
    parts = encode_parts(value)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Marker:
    """What a marker decodes to until its array is converted; one left over means malformed."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


_DECODED_MARKERS = {code: _Marker(code) for code in _MARKERS}


class _Decoder:
    """Decodes one payload: ``ext`` and ``array`` are msgpack's hooks. Markers are counted as they
    are met and as their arrays are converted, so a stray one is caught at the end. A large payload
    also has a budget of containers: an empty list is one byte of msgpack but some 60 bytes of
    Python, so a hostile payload of empty lists would otherwise take 60 times its size."""

    __slots__ = ("area", "area_start", "area_size", "fd", "budget", "markers")

    def __init__(self, data: Any, area_start: int, area_size: int, fd: int | None = None) -> None:
        self.area = data  # the whole payload in memory (out-of-band data lies past area_start), or
        self.fd = fd  # the file that holds it, read straight into each out-of-band value
        self.area_start, self.area_size = area_start, area_size
        # small payloads cannot take much memory: no budget to keep
        self.budget = area_start // CONTAINER_BYTES + 1024 if area_start > COUNT_ABOVE_BYTES else None
        self.markers = 0  # met and not yet converted

    def _check_range(self, start: object, length: object, what: str) -> None:
        if type(start) is not int or type(length) is not int or start < 0 or length < 0 \
                or start + length > self.area_size:
            raise Malformed(f"out-of-band {what} of {length!r} bytes at {start!r} does not fit the "
                            f"{self.area_size}-byte area")

    def _read_into(self, target: memoryview, start: int) -> None:
        """Fill ``target`` from the out-of-band area at ``start`` (copied once)."""
        if self.fd is None:
            begin = self.area_start + start
            target[:] = memoryview(self.area)[begin:begin + target.nbytes]
            return
        offset = self.area_start + start
        while target.nbytes:
            n = os.preadv(self.fd, [target], offset)
            if n == 0:
                raise Malformed("the payload's file is shorter than its head announces")
            target, offset = target[n:], offset + n

    def _oob_bytes(self, items: list) -> bytes:
        if len(items) != 3:
            raise Malformed(f"out-of-band bytes header has {len(items) - 1} fields")
        start, length = items[1], items[2]
        self._check_range(start, length, "bytes")
        if self.fd is None:
            begin = self.area_start + start
            return bytes(memoryview(self.area)[begin:begin + length])
        if length <= 1 << 30:  # one read straight into the result (a tmpfs file reads whole)
            data = os.pread(self.fd, length, self.area_start + start)
            if len(data) == length:
                return data
        buffer = bytearray(length)
        self._read_into(memoryview(buffer), start)
        return bytes(buffer)

    def run(self, head: Any) -> Any:
        if self.budget is None:
            value = msgpack.unpackb(head, ext_hook=self.ext, list_hook=self.array, raw=False, strict_map_key=False)
        else:
            value = msgpack.unpackb(head, ext_hook=self.ext, list_hook=self.array, object_hook=self.counted,
                                    raw=False, strict_map_key=False)
        if self.markers:
            raise Malformed("a marker outside the first place of an array")
        return value

    def counted(self, container: Any) -> Any:
        self.budget -= 1  # type: ignore[operator]
        if self.budget < 0:  # type: ignore[operator]
            raise Malformed(f"more than one container per {CONTAINER_BYTES} bytes of payload")
        return container

    def ext(self, code: int, data: bytes) -> Any:
        if code in _DECODED_MARKERS and not data:
            self.markers += 1
            return _DECODED_MARKERS[code]
        if code == _BIGINT:
            if len(data) > MAX_INT_BYTES:
                raise Malformed(f"int of {len(data)} bytes is above the {MAX_INT_BYTES}-byte limit")
            return int.from_bytes(data, "little", signed=True)
        if code == _COMPLEX:
            if len(data) != _COMPLEX_PAIR.size:
                raise Malformed(f"complex of {len(data)} bytes, expected {_COMPLEX_PAIR.size}")
            return complex(*_COMPLEX_PAIR.unpack(data))
        raise Malformed(f"unknown extension type {code} of {len(data)} bytes")

    def array(self, items: list) -> Any:
        if self.budget is not None:
            self.counted(items)
        if not items or type(items[0]) is not _Marker:
            return items
        self.markers -= 1
        code = items[0].code
        if code == _TUPLE:
            return tuple(items[1:])
        if code == _SET:
            return set(items[1:])
        if code == _FROZENSET:
            return frozenset(items[1:])
        if code == _OOB_BYTES:
            return self._oob_bytes(items)
        return self._ndarray(items, code == _OOB_ARRAY)

    def _ndarray(self, items: list, oob: bool) -> Any:
        if len(items) != (7 if oob else 6):
            raise Malformed(f"array header has {len(items) - 1} fields")
        described, shape, order, scalar = items[1:5]
        if type(shape) is not list or len(shape) > MAX_NDIM or any(type(n) is not int or n < 0 for n in shape):
            raise Malformed(f"array shape {shape!r} is not a list of at most {MAX_NDIM} sizes >= 0")
        if order not in ("C", "F") or type(scalar) is not bool or (scalar and shape):
            raise Malformed(f"array order {order!r} or scalar flag {scalar!r} is invalid")
        if type(described) is not str and not _is_descr(described):
            raise Malformed(f"array dtype {described!r} is neither a type string nor a field list")
        try:
            import numpy as np
        except ImportError:
            raise NeedsNumpy("the result holds a numpy array, and numpy cannot be imported here; "
                             "install numpy on this side") from None
        dtype = np.dtype(described)
        if dtype.hasobject:
            raise Malformed(f"array dtype {dtype} holds Python objects")
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        if oob:
            start, length = items[5], items[6]
            self._check_range(start, length, "array")
            if length != nbytes:
                raise Malformed(f"out-of-band array of {length} bytes, but its shape {shape} and dtype {dtype} "
                                f"need {nbytes}")
            array = np.empty(count, dtype=dtype)
            self._read_into(memoryview(array.view(np.uint8)), start)  # type: ignore[arg-type]
        else:
            raw = items[5]
            if type(raw) is not bytes or len(raw) != nbytes:
                raise Malformed(f"array of shape {shape} and dtype {dtype} needs {nbytes} bytes, "
                                f"has {len(raw) if type(raw) is bytes else type(raw).__name__}")
            # writable, as an unpickled array would be
            array = np.frombuffer(bytearray(raw), dtype=dtype, count=count) if count else np.empty(0, dtype=dtype)
        array = array.reshape(shape, order=order)
        return array[()] if scalar else array


def _is_descr(described: object) -> bool:
    """A structured dtype's ``descr``: a list of (name, format[, shape]) tuples (formats nest)."""
    if type(described) is not list:
        return False
    for field in described:
        if type(field) is not tuple or not 2 <= len(field) <= 3:
            return False
        name, fmt = field[0], field[1]
        if not (type(name) is str or (type(name) is tuple and all(type(n) is str for n in name))):
            return False
        if not (type(fmt) is str or _is_descr(fmt)):
            return False
        if len(field) == 3 and not (type(field[2]) is tuple and all(type(n) is int and n >= 0 for n in field[2])):
            return False
    return True


def decode(data: Any) -> Any:
    """Decode a payload held in memory (bytes or a bytearray).

    Builds plain values only: no class is looked up and no code runs. Raises Malformed (a
    ValueError) for anything that is not a payload of ``encode``, NeedsNumpy for an array when
    numpy is missing here.
    """
    try:
        if data and _SCALAR_FIRST[data[0]]:  # None, a bool, number, str or bytes: nothing to hook
            return msgpack.unpackb(data, raw=False)
        if data[:1] != b"\xc1":
            return _Decoder(data, len(data), 0).run(data)
        view = memoryview(data)
        head_len = _head_length(view[:_HEAD_LEN.size], len(view))
        area_start = _HEAD_LEN.size + head_len
        return _Decoder(data, area_start, len(view) - area_start).run(view[_HEAD_LEN.size:area_start])
    except Malformed:
        raise
    except Exception as exc:  # msgpack and numpy raise many unrelated types; all mean "malformed" here
        raise Malformed(f"{type(exc).__name__}: {exc}") from exc


def decode_file(fd: int, size: int) -> Any:
    """Decode the payload held by the ``size`` bytes of the regular file ``fd``; out-of-band values
    are read straight into the objects that hold them (one copy, no mapping the file's writer could
    truncate under us). Raises as ``decode`` does, and OSError when the file cannot be read."""
    try:
        mark = os.pread(fd, _HEAD_LEN.size, 0)
        if mark[:1] != b"\xc1":
            data = bytearray(size)
            _Decoder(None, 0, size, fd)._read_into(memoryview(data), 0)
            return decode(data)
        head_len = _head_length(mark, size)
        head = os.pread(fd, head_len, _HEAD_LEN.size)
        if len(head) != head_len:
            raise Malformed("the payload's file is shorter than its head")
        area_start = _HEAD_LEN.size + head_len
        return _Decoder(None, area_start, size - area_start, fd).run(head)
    except (Malformed, OSError):
        raise
    except Exception as exc:  # as in decode
        raise Malformed(f"{type(exc).__name__}: {exc}") from exc


def _head_length(mark: Any, size: int) -> int:
    if len(mark) < _HEAD_LEN.size:
        raise Malformed(f"a {size}-byte payload with an out-of-band mark")
    _, head_len = _HEAD_LEN.unpack(mark[:_HEAD_LEN.size])
    if _HEAD_LEN.size + head_len > size:
        raise Malformed(f"head of {head_len} bytes runs past the {size}-byte payload")
    return head_len


def describe_exception(exc: BaseException) -> bytes:
    """An exception as a plain payload: a map of its class's ``module`` and ``qualname``, and, as
    far as they are plain data, its ``args`` (a tuple; absent if any is not plain), ``notes``
    (from ``add_note``) and ``attrs`` (its ``__dict__``, each entry that is plain)."""
    cls = type(exc)
    info: dict[str, object] = {"module": str(cls.__module__), "qualname": str(cls.__qualname__)}
    try:
        args = tuple(exc.args)
        if isinstance(exc, OSError) and exc.filename is not None:  # file names are not in its args
            args = (exc.errno, exc.strerror, exc.filename, None, exc.filename2)
        encode(args)
        info["args"] = args
    except Exception:  # noqa: BLE001 - not plain: the client falls back to a RemoteError
        pass
    notes = getattr(exc, "__notes__", None)
    if type(notes) is list and all(type(n) is str for n in notes):
        info["notes"] = notes
    attrs = {}
    for key, value in list(getattr(exc, "__dict__", {}).items()):
        if type(key) is str and not key.startswith("__"):
            try:
                encode(value)
            except Exception:  # noqa: BLE001 - one attribute that is not plain is left out
                continue
            attrs[key] = value
    info["attrs"] = attrs
    data = encode(info)
    if len(data) > MAX_EXCEPTION_BYTES:
        data = encode({"module": info["module"], "qualname": info["qualname"]})
    return data

"""The messages between the trusted test runner and the sandboxed program: length-prefixed JSON
whose values are plain data only.

Both sides import this file (the harness inside the program's sandbox, the runner inside its own);
it uses the standard library alone. A value crosses as itself only when its type is *exactly* one
of None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset (subclasses do
not count: a `str` subclass with a forged `__eq__` must not arrive as a `str`). Anything else the
program hands over becomes a reference `{"r": id, "n": label}` that the runner wraps in an opaque
proxy. Decoding never runs code: it builds the containers above and nothing else.
"""
import json
import os
import struct

MAX_MESSAGE = 16 << 20
"Largest message either side accepts (bytes); a bigger one is a protocol error."
MAX_DEPTH = 100
"Deepest nesting of containers either side encodes or accepts."
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The other side sent something that is not a well-formed message."""


def encode(value, to_ref, depth=0):
    """`value` as JSON-ready data; objects that are not plain data go through `to_ref(obj)`."""
    kind = type(value)
    if depth > MAX_DEPTH:
        raise ValueError("value nested deeper than %d levels" % MAX_DEPTH)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if value == value and value not in (float("inf"), float("-inf")) else {"f": repr(value)}
    if kind is list:
        return [encode(v, to_ref, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        tag = {tuple: "t", set: "s", frozenset: "z"}[kind]
        return {tag: [encode(v, to_ref, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, to_ref, depth + 1), encode(v, to_ref, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    return to_ref(value)


def decode(data, from_ref, depth=0):
    """The inverse of `encode`; `from_ref(id, label)` makes whatever stands for a reference."""
    kind = type(data)
    if depth > MAX_DEPTH:
        raise ProtocolError("message nested deeper than %d levels" % MAX_DEPTH)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, from_ref, depth + 1) for v in data]
    if kind is not dict or len(data) not in (1, 2):
        raise ProtocolError("unexpected %s in a message" % kind.__name__)
    if "r" in data:
        ref, label = data["r"], data.get("n", "")
        if type(ref) is not int or type(label) is not str:
            raise ProtocolError("malformed reference")
        return from_ref(ref, label)
    (tag, body), = data.items()
    if tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if type(body) is not list:
        raise ProtocolError("malformed %r value" % tag)
    items = [decode(v, from_ref, depth + 1) for v in body]
    if tag == "t":
        return tuple(items)
    if tag in ("s", "z"):
        return (set if tag == "s" else frozenset)(items)
    if tag == "d" and all(type(p) is list and len(p) == 2 for p in items):
        return {k: v for k, v in items}
    raise ProtocolError("unknown tag %r" % tag)


def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ValueError("message of %d bytes exceeds the %d-byte limit" % (len(data), MAX_MESSAGE))
    _write_all(fd, _HEADER.pack(len(data)) + data)


def receive(fd):
    """The next message, or None at a clean end of stream."""
    header = _read_exactly(fd, _HEADER.size, eof_ok=True)
    if header is None:
        return None
    size, = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ProtocolError("announced message of %d bytes exceeds the limit" % size)
    try:
        return json.loads(_read_exactly(fd, size).decode("utf-8"))
    except ValueError as exc:
        raise ProtocolError("not JSON: %s" % exc) from None


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd, size, eof_ok=False):
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            if eof_ok and left == size:
                return None
            raise EOFError("the other side closed the channel mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)

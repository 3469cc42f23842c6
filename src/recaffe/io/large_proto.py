"""Binary protos of any size (``.caffemodel`` files over 2 GB).

protobuf refuses any single length-delimited field of 2 GiB or more: python's upb runtime (measured
with protobuf 7) reports a ``DecodeError`` ("Wire format was corrupt") as soon as one layer, or one
blob's packed data, is that big. A whole file over 2 GiB whose layers are smaller does parse in upb,
but with the file's bytes and the parsed message in memory at once. (Caffe's own reader stops at
INT_MAX bytes for the whole file.)

Files up to ``MAX_PARSE_BYTES`` are parsed in one go. Larger ones are mapped into memory and their
wire format is walked here (tag and length varints): consecutive fields are merged in segments of at
most ``MAX_PARSE_BYTES``; a bigger submessage (a layer, a blob) is walked the same way into the
submessage; a bigger packed array of floats/doubles (a blob's data) is merged in chunks. Protobuf
defines parsing concatenated pieces as merging them, and a packed repeated field's pieces as
appending, so the result is the message a single parse would give.
"""
from __future__ import annotations

import mmap
import os

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message

from ..errors import RecaffeError
from .protofiles import ProtoFileError, check_path, check_regular_file, read_binary

MAX_PARSE_BYTES = 1 << 28  # well below protobuf's 2 GiB limit; bounds the extra memory one parse takes

_FD = _descriptor.FieldDescriptor
_ELEMENT_BYTES = {_FD.TYPE_FLOAT: 4, _FD.TYPE_FIXED32: 4, _FD.TYPE_SFIXED32: 4,
                  _FD.TYPE_DOUBLE: 8, _FD.TYPE_FIXED64: 8, _FD.TYPE_SFIXED64: 8}


class WireFormatError(RecaffeError, ValueError):
    """Bytes that are not a valid protobuf encoding (or need a parse protobuf cannot do)."""


def read_binary_any_size(path: str | os.PathLike, msg, what: str | None = None,
                         max_parse: int | None = None):
    """``protofiles.read_binary`` for files of any size: larger than ``max_parse`` bytes (default
    ``MAX_PARSE_BYTES``), the file is mapped and merged piece by piece (see the module docstring)."""
    path = check_path(path)
    max_parse = max_parse or MAX_PARSE_BYTES
    what = what or type(msg).__name__
    try:
        check_regular_file(path, what)
        size = os.path.getsize(path)
    except ProtoFileError:
        raise
    except FileNotFoundError:
        raise ProtoFileError(f"{path}: file not found") from None
    except OSError as e:
        raise ProtoFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    if size <= max_parse:
        return read_binary(path, msg, what)
    problem = None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            merge_region(msg, view, 0, size, max_parse)
        except (_message.DecodeError, WireFormatError) as e:
            problem = str(e)
        finally:
            view.release()  # before the map closes, whatever happened
    if problem is not None:
        raise ProtoFileError(f"{path}: cannot be read as a binary {what} ({size} bytes): the file is "
                             f"truncated or is not a {what} ({problem})")
    return msg


def merge_region(msg, buf: memoryview, start: int, end: int, max_parse: int = MAX_PARSE_BYTES) -> None:
    """Merge the serialized ``msg`` fields in ``buf[start:end]`` into ``msg``, no single protobuf parse
    taking more than ``max_parse`` bytes."""
    if max_parse < 64:
        raise ValueError("max_parse must be at least 64 bytes")
    if end - start <= max_parse:
        msg.MergeFromString(buf[start:end])
        return
    segment = start  # fields from here to the current one are merged together
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        payload = None
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, end)
            payload, pos = pos, pos + length
        else:
            raise WireFormatError(f"unsupported wire type {wire_type} at byte {field_start}")
        if pos > end:
            raise WireFormatError(f"field {number} at byte {field_start} of {msg.DESCRIPTOR.full_name} runs "
                                  f"past the end of its message (byte {end})")
        if pos - segment <= max_parse:
            continue
        if field_start > segment:
            msg.MergeFromString(buf[segment:field_start])
        segment = field_start
        if pos - field_start > max_parse:  # only a length-delimited field can be this big
            _merge_big_field(msg, number, buf, field_start, payload, pos, max_parse)
            segment = pos
    if end > segment:
        msg.MergeFromString(buf[segment:end])


def _merge_big_field(msg, number: int, buf: memoryview, field_start: int, payload: int, end: int,
                     max_parse: int) -> None:
    field = msg.DESCRIPTOR.fields_by_number.get(number)
    name = f"{msg.DESCRIPTOR.full_name}.{field.name if field else number}"
    if field is not None and field.type == _FD.TYPE_MESSAGE:
        if field.is_repeated:
            child = getattr(msg, field.name).add()
        else:
            child = getattr(msg, field.name)
        merge_region(child, buf, payload, end, max_parse)
        return
    size = _ELEMENT_BYTES.get(field.type) if field is not None and field.is_repeated else None
    if size is None:
        raise WireFormatError(f"field {name} holds {end - payload} bytes, more than one protobuf parse can "
                              "take")
    if (end - payload) % size:
        raise WireFormatError(f"packed field {name} at byte {field_start} holds {end - payload} bytes, not a "
                              f"whole number of {size}-byte values")
    tag = _encode_varint((number << 3) | 2)
    step = (max_parse - 32) // size * size
    for a in range(payload, end, step):
        b = min(a + step, end)
        msg.MergeFromString(tag + _encode_varint(b - a) + buf[a:b])


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise WireFormatError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireFormatError(f"varint too long at byte {pos}")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)

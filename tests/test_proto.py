"""Our caffe.proto against Caffe's schema tables (../shared/reference/caffe-proto-*.tsv), and the
binary/text file helpers."""
import pytest
from google.protobuf import descriptor

from conftest import require_reference
from recaffe.blob import Blob
from recaffe.io.fork_fields import FORK_FIELDS, FORK_MESSAGES
from recaffe.io.protofiles import ProtoFileError, read_binary, read_text, write_binary
from recaffe.proto import caffe_pb2

TYPES = {descriptor.FieldDescriptor.TYPE_DOUBLE: "double", descriptor.FieldDescriptor.TYPE_FLOAT: "float",
         descriptor.FieldDescriptor.TYPE_INT64: "int64", descriptor.FieldDescriptor.TYPE_UINT64: "uint64",
         descriptor.FieldDescriptor.TYPE_INT32: "int32", descriptor.FieldDescriptor.TYPE_UINT32: "uint32",
         descriptor.FieldDescriptor.TYPE_BOOL: "bool", descriptor.FieldDescriptor.TYPE_STRING: "string",
         descriptor.FieldDescriptor.TYPE_BYTES: "bytes"}


def rows(path):
    lines = [ln.rstrip("\n").split("\t") for ln in open(path) if not ln.startswith("#")]
    return lines[1:]


def message(name):
    d = caffe_pb2.DESCRIPTOR
    outer, _, inner = name.partition(".")
    m = d.message_types_by_name[outer]
    return m.nested_types_by_name[inner] if inner else m


def test_every_field_matches_caffes_schema():
    table = rows(require_reference("caffe-proto-fields.tsv"))
    assert len(table) > 400
    for msg, field, number, label, typ, default, opts in table:
        f = message(msg).fields_by_name.get(field)
        assert f is not None, f"{msg}.{field} missing"
        assert f.number == int(number), f"{msg}.{field} number"
        ours = "repeated" if f.is_repeated else "required" if f.is_required else "optional"
        assert ours == label, f"{msg}.{field} label"
        if f.message_type is not None:
            assert f.message_type.full_name == "caffe." + typ, f"{msg}.{field} type"
        elif f.enum_type is not None:
            assert f.enum_type.full_name == "caffe." + typ, f"{msg}.{field} type"
            if default:
                assert f.enum_type.values_by_number[f.default_value].name == default
        else:
            assert TYPES[f.type] == typ, f"{msg}.{field} type"
            if default:
                want = {"true": True, "false": False}.get(default, default)
                if typ in ("float", "double"):
                    assert f.default_value == pytest.approx(float(want), rel=1e-6)
                elif typ == "string":
                    assert f.default_value == want
                elif typ != "bool":
                    assert f.default_value == int(want)
                else:
                    assert f.default_value == want
        assert ("packed" in opts) == f.is_packed, f"{msg}.{field} packed"
    # and every field of ours that is not in Caffe's tables is a documented fork field
    ours = {(m, f) for m in caffe_pb2.DESCRIPTOR.message_types_by_name
            for f in caffe_pb2.DESCRIPTOR.message_types_by_name[m].fields_by_name}
    extra = {(m, f) for m, f in ours - {(r[0], r[1]) for r in table} if m not in FORK_MESSAGES}
    assert extra == set(FORK_FIELDS)
    assert {(r[0], r[1]) for r in table} <= ours


def test_every_enum_value_matches():
    for enum, value, number in rows(require_reference("caffe-proto-enums.tsv")):
        outer, _, inner = enum.partition(".")
        e = (caffe_pb2.DESCRIPTOR.enum_types_by_name[outer] if not inner
             else message(outer).enum_types_by_name[inner])
        assert e.values_by_name[value].number == int(number), f"{enum}.{value}"


def test_binaryproto_round_trip_float_and_double(tmp_path):
    import numpy as np
    import torch
    for dtype in (torch.float32, torch.float64):
        b = Blob((2, 3, 4), dtype)
        b.data[...] = np.arange(24).reshape(2, 3, 4) / 7
        b.diff[...] = 1.5
        path = tmp_path / "b.binaryproto"
        write_binary(path, b.to_proto(write_diff=True))
        back = Blob((), dtype)
        back.from_proto(read_binary(path, caffe_pb2.BlobProto()))
        assert back.shape == (2, 3, 4)
        assert np.array_equal(back.data, b.data) and np.array_equal(back.diff, b.diff)


def test_legacy_4d_blob_shape_is_read():
    proto = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6])
    b = Blob()
    b.from_proto(proto)
    assert b.shape == (1, 2, 1, 3)


def test_text_errors_name_file_line_column(tmp_path):
    path = tmp_path / "s.prototxt"
    path.write_text('base_lr: 0.1\nmomentum: fast\n')
    with pytest.raises(ProtoFileError, match=rf"^{path}:2:11: "):
        read_text(path, caffe_pb2.SolverParameter())
    with pytest.raises(ProtoFileError, match="file not found"):
        read_text(tmp_path / "nope.prototxt", caffe_pb2.SolverParameter())


def test_pycaffe_proto_module_path():
    from caffe.proto import caffe_pb2 as pb
    assert pb is caffe_pb2

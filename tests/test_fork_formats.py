"""Caffe forks' binary files: fork params under numbers BVLC uses for something else, NVCaffe's fp16
blobs, and parse errors that name the fork of an unsupported field."""
import struct

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from recaffe.io.netfiles import read_net_binary
from recaffe.io.protofiles import ProtoFileError, parse_text
from recaffe.proto import caffe_pb2


def varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number, wire, payload):
    """One field in protobuf's wire format: tag, then the payload (length-prefixed for wire 2)."""
    tag = varint(number << 3 | wire)
    if wire == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


def net_bytes(*layers):
    return b"".join(field(100, 2, layer) for layer in layers)


def layer_bytes(name, type_, *extra):
    base = caffe_pb2.LayerParameter(name=name, type=type_)
    base.blobs.add().CopyFrom(blob([1.5, -2.0]))
    return base.SerializeToString() + b"".join(extra)


def blob(values):
    b = caffe_pb2.BlobProto()
    b.shape.dim.append(len(values))
    b.data.extend(values)
    return b


def read(tmp_path, data):
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(data)
    return read_net_binary(path)


def test_deeplab_interp_param_under_bvlc_input_param_number(tmp_path):
    interp = caffe_pb2.InterpParameter(zoom_factor=8, pad_end=-1).SerializeToString()
    net = read(tmp_path, net_bytes(layer_bytes("up", "Interp", field(143, 2, interp))))
    layer = net.layer[0]
    assert not layer.HasField("input_param")
    assert layer.interp_param.zoom_factor == 8 and layer.interp_param.pad_end == -1
    assert list(layer.blobs[0].data) == [1.5, -2.0]  # the weights are untouched


def test_segnet_upsample_param_under_bvlc_embed_param_number(tmp_path):
    up = caffe_pb2.UpsampleParameter(scale=2, upsample_h=7, upsample_w=9).SerializeToString()
    net = read(tmp_path, net_bytes(layer_bytes("u", "Upsample", field(137, 2, up)),
                                   layer_bytes("e", "Embed", field(137, 2, caffe_pb2.EmbedParameter(
                                       num_output=5).SerializeToString()))))
    assert (net.layer[0].upsample_param.upsample_h, net.layer[0].upsample_param.upsample_w) == (7, 9)
    assert not net.layer[0].HasField("embed_param")
    # a BVLC Embed layer keeps its embed_param
    assert net.layer[1].embed_param.num_output == 5 and not net.layer[1].HasField("upsample_param")


def test_pspnet_bn_param_152_is_renumbered(tmp_path):
    # PSPNet's BNParameter: slope_filler 1, bias_filler 2, momentum 3, eps 4, frozen 5
    psp = (field(1, 2, caffe_pb2.FillerParameter(type="constant", value=1).SerializeToString())
           + field(3, 5, struct.pack("<f", 0.95)) + field(4, 5, struct.pack("<f", 1e-3))
           + field(5, 0, varint(1)))
    layer = read(tmp_path, net_bytes(layer_bytes("bn", "BN", field(152, 2, psp)))).layer[0]
    bn = layer.bn_param
    assert bn.slope_filler.type == "constant" and bn.slope_filler.value == 1
    assert bn.momentum == pytest.approx(0.95) and bn.eps == pytest.approx(1e-3) and bn.frozen
    assert not bn.HasField("scale_filler")


def test_nvcaffe_layer_precision_fields(tmp_path):
    # NVCaffe: forward_type 145 and forward_math 147 as enum varints (BVLC: parameter_param, swish_param)
    layer = read(tmp_path, net_bytes(layer_bytes("c", "Convolution", field(145, 0, varint(caffe_pb2.FLOAT16)),
                                                 field(147, 0, varint(caffe_pb2.FLOAT))))).layer[0]
    assert layer.forward_type == caffe_pb2.FLOAT16 and layer.forward_math == caffe_pb2.FLOAT
    assert not layer.HasField("parameter_param") and not layer.HasField("swish_param")


@pytest.mark.parametrize("kind, dtype", [(caffe_pb2.FLOAT16, "<f2"), (caffe_pb2.FLOAT, "<f4"),
                                         (caffe_pb2.DOUBLE, "<f8")])
def test_nvcaffe_raw_data_blobs_load(kind, dtype):
    from recaffe.blob import Blob

    values = np.array([[0.5, -1.25, 3.0], [1e-3, 65504.0, -0.0]])
    proto = caffe_pb2.BlobProto(raw_data_type=kind, raw_data=values.astype(dtype).tobytes())
    proto.shape.dim.extend([2, 3])
    b = Blob(())
    b.from_proto(proto)
    np.testing.assert_array_equal(b.data, values.astype(dtype).astype(np.float32))


def test_raw_data_of_a_non_float_type_is_refused():
    from recaffe.blob import Blob

    proto = caffe_pb2.BlobProto(raw_data_type=caffe_pb2.INT, raw_data=b"\0" * 8)
    proto.shape.dim.append(2)
    with pytest.raises(ValueError, match="INT"):
        Blob(()).from_proto(proto)


def test_unsupported_fork_field_names_file_line_and_fork():
    text = 'name: "n"\nlayer {\n  name: "crf"\n  type: "DenseCRF"\n  dense_crf_param { max_iter: 10 }\n}\n'
    with pytest.raises(ProtoFileError) as e:
        parse_text(text, caffe_pb2.NetParameter(), filename="deeplab_crf.prototxt")
    msg = str(e.value)
    assert "deeplab_crf.prototxt:5" in msg and "DeepLab" in msg


def test_fork_param_that_breaks_the_full_parse_still_gives_the_weights(tmp_path):
    # a fork's message under 137 (BVLC's embed_param) whose bytes are not an EmbedParameter: a
    # truncated varint inside makes the full parse fail; names, types and blobs still load.
    bad = field(137, 2, b"\x08\xff")
    data = net_bytes(layer_bytes("up", "SomeForkType", bad), layer_bytes("fc", "InnerProduct"))
    with pytest.raises(DecodeError):
        caffe_pb2.NetParameter().ParseFromString(data)
    net = read(tmp_path, data)
    assert [(l.name, l.type) for l in net.layer] == [("up", "SomeForkType"), ("fc", "InnerProduct")]
    assert list(net.layer[1].blobs[0].data) == [1.5, -2.0]


def test_truncated_caffemodel_is_still_an_error(tmp_path):
    data = net_bytes(layer_bytes("fc", "InnerProduct"))
    with pytest.raises(ProtoFileError, match="truncated"):
        read(tmp_path, data[:-3])


def test_nvcaffe_fields_are_not_ignored_silently(tmp_path):
    from helpers import capture_log, make_net, write

    import caffe

    with capture_log() as lines:
        make_net('reduce_buckets: 4\nlayer { name: "d" type: "Input" top: "x" '
                 'input_param { shape { dim: 1 } } backward_type: FLOAT16 }')
    assert any("NVCaffe's fields reduce_buckets, layer backward_type are read but not used" in line
               for line in lines)
    with capture_log() as lines:  # the mixed-precision fields recaffe acts on (precision.py)
        make_net('default_forward_type: FLOAT16\nglobal_grad_scale: 8\nlayer { name: "d" type: "Input" '
                 'top: "x" input_param { shape { dim: 1 } } forward_math: FLOAT }')
    assert not any("not used" in line for line in lines)
    net = write(tmp_path, "n.prototxt", 'layer { name: "d" type: "Input" top: "x" input_param { shape { dim: 1 } } }')
    solver = write(tmp_path, "s.prototxt", f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" larc: true '
                   'solver_data_type: FLOAT16')
    with capture_log() as lines:
        caffe.get_solver(solver)
    assert any("NVCaffe's solver fields (solver_data_type, larc)" in line for line in lines)


def test_deeplab_transform_fields_name_the_fork():
    text = 'layer { name: "d" type: "ImageSegData" transform_param { crop_height: 321 } }'
    with pytest.raises(ProtoFileError, match=r"train\.prototxt:1:.*crop_height.*DeepLab"):
        parse_text(text, caffe_pb2.NetParameter(), filename="train.prototxt")


def test_nvcaffe_reader_and_cudnn_settings_are_logged_as_unused():
    from helpers import capture_log, make_net
    with capture_log() as lines:
        make_net('eltwise_mem_sharing: true\nlayer { name: "d" type: "Input" top: "x" cudnn_math_override: 1 '
                 'input_param { shape { dim: 1 dim: 1 dim: 3 dim: 3 } } }\n'
                 'layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 1 '
                 'kernel_size: 1 conv_algos_override: "1,1,1" } }')
    assert any("NVCaffe's fields eltwise_mem_sharing, layer cudnn_math_override, layer conv_algos_override "
               "are read but not used" in line for line in lines), lines

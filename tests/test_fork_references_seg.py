"""The segmentation forks' reference files (../shared/reference/forks/deeplab and .../segnet; their
outputs are checked by test_reference_cases.test_fork_case): their weights.caffemodel keeps the forks'
params under the forks' field numbers, which io/fork_fields.py re-reads."""
import numpy as np
import pytest

import caffe
from conftest import require_reference
from recaffe.io.netfiles import read_net_binary


@pytest.mark.parametrize("fork, case, field, expected", [
    ("deeplab", "interp_zoom2_pad_end_neg", "interp_param", {"zoom_factor": 2, "pad_end": -1}),
    ("deeplab", "interp_height_width", "interp_param", {"height": 11, "width": 7}),
    ("deeplab", "segacc_ignore255", "seg_accuracy_param", {"ignore_label": [255]}),
    ("segnet", "upsample_hw_odd", "upsample_param", {"upsample_h": 7, "upsample_w": 9}),
    ("segnet", "upsample_pad_out_h", "upsample_param", {"scale": 2, "pad_out_h": True}),
    ("segnet", "bn_inference_test", "bn_param", {"bn_mode": caffe.proto.caffe_pb2.BNParameter.INFERENCE}),
])
def test_fork_params_read_from_binary(fork, case, field, expected):
    """The fork's numbers (interp_param 143, seg_accuracy_param 144, upsample_param 137, bn_param
    45) land in our fields when the .caffemodel is read."""
    d = require_reference("forks", fork, case)
    net = read_net_binary(str(d / "weights.caffemodel"))
    layer = next(lay for lay in net.layer if lay.name == "L")
    assert layer.HasField(field)
    for name, value in expected.items():
        got = getattr(getattr(layer, field), name)
        assert (list(got) if isinstance(value, list) else got) == value, (field, name)
    assert not layer.HasField("input_param") and not layer.HasField("crop_param")
    assert not layer.HasField("embed_param")


def _field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field: the key, then a length-prefixed payload (wire 2) or the raw value."""
    from google.protobuf.internal.encoder import _VarintBytes

    key = _VarintBytes(number << 3 | wire)
    return key + (_VarintBytes(len(payload)) + payload if wire == 2 else payload)


def test_pspnet_bn_param_152_read_from_binary(tmp_path):
    """PSPNet's bn_param is field 152 with its own numbers 1-6 (slope_filler, bias_filler, momentum,
    eps, frozen, engine): a .caffemodel written by PSPNet yields our BNParameter fields."""
    import struct

    filler = caffe.proto.caffe_pb2.FillerParameter(type="constant", value=1).SerializeToString()
    bn = (_field(1, 2, filler) + _field(3, 5, struct.pack("<f", 0.95)) + _field(4, 5, struct.pack("<f", 1e-3))
          + _field(5, 0, b"\x01"))
    layer = caffe.proto.caffe_pb2.LayerParameter(name="bn", type="BN").SerializeToString()
    layer += _field(152, 2, bn)
    path = tmp_path / "psp.caffemodel"
    path.write_bytes(_field(100, 2, layer))
    p = read_net_binary(str(path)).layer[0].bn_param
    assert p.frozen and p.slope_filler.type == "constant" and p.slope_filler.value == 1
    assert np.isclose(p.momentum, 0.95) and np.isclose(p.eps, 1e-3)
    assert not p.HasField("bn_mode") and not p.HasField("scale_filler")

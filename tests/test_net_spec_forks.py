"""NetSpec with the forks' layers and params, as the SSD fork's model scripts write them; whole floats
in integer fields (Python 2 scripts' `/`); the fork's model_libs imported as caffe.model_libs."""
import sys

import pytest

import caffe
from caffe import layers as L
from caffe import params as P


def test_ssd_head_layers_print_the_forks_params():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 300, 300]))
    n.conv = L.Convolution(n.data, num_output=8, kernel_size=3, pad=(3 - 1) / 2)  # py2-style division
    n.norm = L.Normalize(n.conv, norm_param=dict(across_spatial=False, scale_filler=dict(type="constant", value=20),
                                                 channel_shared=False))
    n.perm = L.Permute(n.norm, order=[0, 2, 3, 1])
    n.prior = L.PriorBox(n.conv, n.data, min_size=30.0, max_size=60.0, aspect_ratio=[2], flip=True,
                         clip=False, variance=[0.1, 0.1, 0.2, 0.2], step=8)
    n.det = L.DetectionOutput(n.perm, n.perm, n.prior, detection_output_param=dict(
        num_classes=21, share_location=True, background_label_id=0,
        nms_param=dict(nms_threshold=0.45, top_k=400), code_type=P.PriorBox.CENTER_SIZE, keep_top_k=200,
        confidence_threshold=0.01))
    text = str(n.to_proto())
    for expected in ["pad: 1\n", "norm_param {\n    across_spatial: false\n    scale_filler {\n      type: \"constant\"\n"
                     "      value: 20\n    }\n    channel_shared: false\n  }",
                     "permute_param {\n    order: 0\n    order: 2\n    order: 3\n    order: 1\n  }",
                     "prior_box_param {\n    min_size: 30\n    max_size: 60\n    aspect_ratio: 2\n",
                     "nms_param {\n      nms_threshold: 0.45\n      top_k: 400\n    }",
                     "code_type: CENTER_SIZE"]:
        assert expected in text, expected


def test_a_fractional_float_in_an_integer_field_is_still_an_error():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=3, pad=1.5)
    with pytest.raises(TypeError):
        n.to_proto()


def test_model_libs_is_found_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "model_libs.py").write_text("import caffe\nfrom caffe import layers as L\n"
                                            "def Body(net):\n    net.relu = L.ReLU(net.data, in_place=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("caffe.model_libs", None)
    from caffe.model_libs import Body

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1]))
    Body(n)
    assert 'type: "ReLU"' in str(n.to_proto())
    sys.modules.pop("caffe.model_libs", None)

"""The segmentation forks' published deploy nets (../shared/reference/forks/models, read in place):
DeepLab v2 VGG-16 (ImageSegData, Interp, MatWrite), PSPNet-50 (PSPNet's BN, pyramid pooling,
Interp) and SegNet (DenseImageData, SegNet's BN, pooling masks, Upsample) build, run forward with
random weights and export (ONNX through onnxruntime, and the generated torch module).

To stay fast on a 2-core machine the forwards run at reduced sizes, edited in memory (stated per
test). With RECAFFE_SLOW=1 the nets are also built and run at their published sizes (DeepLab
513x513, PSPNet 473x473, SegNet 360x480; 10-30 s each) and PSPNet is exported (about 20 s).
"""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import require_reference
from recaffe.io.netfiles import read_net_text
from recaffe.layers.mat_files import read_mat
from recaffe.net import Net
from recaffe.proto import caffe_pb2
from test_export import check_exports, one_torch_thread  # noqa: F401  (fixture)

TEST = caffe_pb2.TEST
slow = pytest.mark.skipif(not os.environ.get("RECAFFE_SLOW"),
                          reason="a full-size forward; set RECAFFE_SLOW=1")


def model(name):
    return read_net_text(require_reference("forks", "models", f"{name}.prototxt"))


def layer(param, name):
    return next(lp for lp in param.layer if lp.name == name)


def random_bn_stats(net, seed=0):
    """Running statistics / scales away from the fillers' constants, so that BN does something."""
    rng = np.random.default_rng(seed)
    for lay in net.layers:
        if lay.type == "BN":
            for i, b in enumerate(lay.blobs):
                if i in (0, 3):  # scale / slope, running variance
                    b.data[...] = rng.uniform(0.5, 1.5, b.shape)
                else:
                    b.data[...] = rng.standard_normal(b.shape) * 0.1


def write_images(tmp_path, sizes, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        line = f"im{i}.png"
        if labels:
            Image.fromarray(rng.integers(0, 11, (h, w), dtype=np.uint8)).save(tmp_path / f"lab{i}.png")
            line += f" lab{i}.png"
        lines.append(line)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "list.txt")


# ------------------------------------------------------------------------------ DeepLab v2
def deeplab_with_input(size):
    """The data layer replaced by an Input of its shape (1, 3, size, size); MatWrite and the Silence
    of the unused label/data_dim tops removed (fc8_interp becomes the output)."""
    p = model("deeplab_v2_vgg16")
    data = caffe_pb2.LayerParameter(name="data", type="Input", top=["data"])
    data.input_param.shape.add().dim.extend([1, 3, size, size])
    p.layer[0].CopyFrom(data)
    keep = [lp for lp in p.layer if lp.type not in ("MatWrite", "Silence")]
    del p.layer[:]
    p.layer.extend(keep)
    return p


def test_deeplab_runs_with_its_image_seg_data_and_mat_write(tmp_path):
    """As published but for the ${...} paths (pointed at generated images) and crop_size 513 -> 97."""
    p = model("deeplab_v2_vgg16")
    data = layer(p, "data")
    data.image_data_param.source = write_images(tmp_path, [(50, 60)], labels=False)
    data.image_data_param.root_folder = f"{tmp_path}/"
    data.transform_param.crop_size = 97
    (tmp_path / "ids.txt").write_text("im0\n")
    (tmp_path / "fc8").mkdir()
    mat = layer(p, "fc8_mat").mat_write_param
    mat.prefix, mat.source = f"{tmp_path}/fc8/", str(tmp_path / "ids.txt")
    net = Net(p, TEST)
    assert {lay.type for lay in net.layers} >= {"ImageSegData", "Interp", "MatWrite", "Silence"}
    net.forward()
    assert net.blobs["data"].shape == (1, 3, 97, 97)
    np.testing.assert_array_equal(net.blobs["label"].data, 255)  # label_type NONE: all ignored
    np.testing.assert_array_equal(net.blobs["data_dim"].data.ravel(), [50, 60])
    # the 50x60 image is padded to 97x97 with the mean values: zeros once the mean is subtracted
    np.testing.assert_allclose(net.blobs["data"].data[0, :, 50:, :], 0, atol=1e-4)
    np.testing.assert_allclose(net.blobs["data"].data[0, :, :, 60:], 0, atol=1e-4)
    scores = net.blobs["fc8_interp"].data
    assert scores.shape == (1, 21, 97, 97) and np.isfinite(scores).all()
    written = read_mat(tmp_path / "fc8" / "im0_blob_0.mat")["data"]
    np.testing.assert_array_equal(written, scores.transpose(3, 2, 1, 0))


def test_deeplab_with_an_input_layer_exports_at_49(tmp_path):
    net = Net(deeplab_with_input(49), TEST)
    assert net.blobs["fc8_interp"].shape == (1, 21, 49, 49)  # 7x7 zoomed by 8
    check_exports(net, tmp_path, rtol=1e-4, atol=1e-4)


@slow
def test_deeplab_forward_at_513():
    net = Net(deeplab_with_input(513), TEST)
    assert net.blobs["fc8_interp"].shape == (1, 21, 513, 513)  # 65x65 zoomed by 8
    assert np.isfinite(net.forward()["fc8_interp"]).all()


# ------------------------------------------------------------------------------ PSPNet
def pspnet(size):
    """PSPNet-50 with its input size*size. At 473 conv5_3 is 60x60 and the pyramid pools it with
    kernels 60/30/20/10 and interpolates back to 60x60; a smaller input scales those to its map
    (the published net only runs at 473)."""
    p = model("pspnet")  # its net-level input_dim is read as an Input layer
    layer(p, "input").input_param.shape[0].dim[2:] = [size, size]
    side = (size - 1) // 8 + 1
    if side != 60:
        for bins in (1, 2, 3, 6):
            pool = layer(p, f"conv5_3_pool{bins}").pooling_param
            pool.kernel_size = pool.stride = side // bins
            interp = layer(p, f"conv5_3_pool{bins}_interp").interp_param
            interp.height = interp.width = side
    return p


def test_pspnet_reduced_runs():
    """Input 89x89: conv5_3 is 12x12, pooled to 1/2/3/6 bins by kernels 12/6/4/2."""
    net = Net(pspnet(89), TEST)
    bn = [lay for lay in net.layers if lay.type == "BN"]
    assert len(bn) == 60 and all(lay.flavour == "pspnet" and lay.frozen and len(lay.blobs) == 4 for lay in bn)
    random_bn_stats(net)
    out = net.forward()["conv6_interp"]
    assert out.shape == (1, 150, 89, 89) and np.isfinite(out).all()


@slow
def test_pspnet_reduced_exports(tmp_path):
    """The export of 25 M parameters (ONNX checker, onnxruntime, the torch module) takes about
    20 s on 2 cores. With random weights the scores reach ~1e4: the tolerance is relative to that."""
    net = Net(pspnet(89), TEST)
    random_bn_stats(net)
    scale = float(np.abs(net.forward()["conv6_interp"]).max())
    check_exports(net, tmp_path, rtol=1e-4, atol=1e-5 * scale)


@slow
def test_pspnet_forward_at_473():
    net = Net(pspnet(473), TEST)
    assert net.blobs["conv5_3"].shape[2:] == (60, 60)
    assert net.blobs["conv6_interp"].shape == (1, 150, 473, 473)
    assert np.isfinite(net.forward()["conv6_interp"]).all()


# ------------------------------------------------------------------------------ SegNet
def segnet(tmp_path, h, w, sizes=None):
    """SegNet inference with its DenseImageData reading generated h x w images. Its upsample5 /
    upsample4 set upsample_h/w for 360x480 inputs (23x30, 45x60); other sizes set them to the
    input of pool4 / pool3 (``sizes``)."""
    p = model("segnet")
    dp = layer(p, "data").dense_image_data_param
    dp.source = write_images(tmp_path, [(h, w)])
    dp.root_folder = f"{tmp_path}/"
    for name, (uh, uw) in (sizes or {}).items():
        up = layer(p, name).upsample_param
        up.upsample_h, up.upsample_w = uh, uw
    return p


def test_segnet_reduced_runs_and_exports(tmp_path):
    """40x48 images (SegNet's 360x480 / 9 and / 10): pool4's input is 3x3, pool3's 5x6."""
    net = Net(segnet(tmp_path, 40, 48, {"upsample5": (3, 3), "upsample4": (5, 6)}), TEST)
    assert sum(lay.type == "BN" and lay.flavour == "segnet" and not lay.learn for lay in net.layers) > 20
    random_bn_stats(net)
    graph = check_exports(net, tmp_path, rtol=1e-4, atol=1e-5)
    assert [name for name, _ in graph.inputs] == ["data"]  # the unused label top is dropped
    prob = net.blobs["prob"].data
    assert prob.shape == (1, 11, 40, 48)
    np.testing.assert_allclose(prob.sum(1), 1, rtol=1e-5)


@slow
def test_segnet_forward_at_360x480(tmp_path):
    net = Net(segnet(tmp_path, 360, 480), TEST)
    assert net.blobs["pool5_D"].shape[2:] == (23, 30) and net.blobs["prob"].shape == (1, 11, 360, 480)
    assert np.isfinite(net.forward()["prob"]).all()

"""caffe.Classifier and caffe.Detector: predictions equal preprocessing by hand + a plain net's forward."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import caffe

RNG = np.random.default_rng(3)
MEAN = np.array([100.0, 120.0, 90.0])  # per channel, in the net's (BGR) order


def deploy(batch, size):
    return (f'name: "tiny"\n'
            f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: {batch} dim: 3 dim: {size} dim: {size} }} }} }}\n'
            'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { '
            'num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.05 } '
            'bias_filler { type: "gaussian" std: 0.1 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { '
            'num_output: 5 weight_filler { type: "gaussian" std: 0.05 } '
            'bias_filler { type: "gaussian" std: 0.1 } } }\n'
            'layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }\n')


@pytest.fixture
def model(tmp_path):
    """A deploy net with batch 4 and 6x6 inputs and random weights saved as a .caffemodel."""
    def make(batch=4, size=6):
        proto = tmp_path / f"deploy_{batch}_{size}.prototxt"
        proto.write_text(deploy(batch, size))
        weights = tmp_path / f"w_{batch}_{size}.caffemodel"
        caffe.Net(str(proto), caffe.TEST).save(str(weights))
        # A batch-1 copy with the same weights computes the expected outputs one crop at a time.
        one = tmp_path / f"one_{size}.prototxt"
        one.write_text(deploy(1, size))
        return str(proto), str(weights), caffe.Net(str(one), caffe.TEST, weights=str(weights))
    return make


def torch_resize(im, dims):
    t = torch.from_numpy(np.asarray(im, dtype=np.float64)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=tuple(dims), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def by_hand(crop, raw_scale=255.0, input_scale=0.5):
    """HWC RGB crop -> CHW BGR, * raw_scale, - MEAN, * input_scale."""
    bgr = crop.transpose(2, 0, 1)[::-1]
    return (bgr * raw_scale - MEAN[:, None, None]) * input_scale


def run_one(net, chw):
    net.blobs["data"].data[...] = chw[None]
    return net.forward()["prob"][0].copy()


def test_classifier_predict_with_oversampling(model):
    proto, weights, ref = model()
    clf = caffe.Classifier(proto, weights, image_dims=(8, 9), mean=MEAN, input_scale=0.5,
                           raw_scale=255.0, channel_swap=(2, 1, 0))
    images = [RNG.random((10, 7, 3)).astype(np.float32), RNG.random((5, 12, 3)).astype(np.float32)]
    preds = clf.predict(images)  # 20 crops through a batch-4 net: the last batch is padded
    assert preds.shape == (2, 5)
    for n, im in enumerate(images):
        big = torch_resize(im, (8, 9))
        # corners, centre (8/2 - 3 = 1, 9/2 - 3 = 1.5 -> 1), then the same five mirrored
        crops = [big[0:6, 0:6], big[0:6, 3:9], big[2:8, 0:6], big[2:8, 3:9], big[1:7, 1:7]]
        crops += [c[:, ::-1] for c in crops]
        expected = np.mean([run_one(ref, by_hand(c)) for c in crops], axis=0)
        np.testing.assert_allclose(preds[n], expected, rtol=1e-4, atol=1e-6)


def test_classifier_predict_centre_crop_and_default_dims(model):
    proto, weights, ref = model()
    clf = caffe.Classifier(proto, weights, image_dims=(8, 9), mean=MEAN, input_scale=0.5,
                           raw_scale=255.0, channel_swap=(2, 1, 0))
    images = [RNG.random((8, 9, 3)).astype(np.float32) for _ in range(5)]
    preds = clf.predict(images, oversample=False)
    assert preds.shape == (5, 5)
    for n, im in enumerate(images):
        np.testing.assert_allclose(preds[n], run_one(ref, by_hand(im[1:7, 1:7])), rtol=1e-4, atol=1e-6)

    plain = caffe.Classifier(proto, weights)  # image_dims default to the input's 6x6, no preprocessing
    assert list(plain.image_dims) == [6, 6]
    im = RNG.random((6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(plain.predict([im], oversample=False)[0], run_one(ref, im.transpose(2, 0, 1)),
                               rtol=1e-4, atol=1e-6)


def test_classifier_rejects_a_mean_of_the_wrong_shape(model, tmp_path):
    proto, weights, _ = model()
    with pytest.raises(ValueError, match="Mean shape incompatible"):
        caffe.Classifier(proto, weights, mean=np.zeros((3, 5, 5)))
    with pytest.raises(FileNotFoundError, match="nowhere.caffemodel"):
        caffe.Classifier(proto, str(tmp_path / "nowhere.caffemodel"))


def _write_png(tmp_path, name, shape):
    pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return str(path), pixels / 255.0


def test_detector_detect_windows(model, tmp_path):
    proto, weights, ref = model(batch=2, size=6)
    det = caffe.Detector(proto, weights, mean=MEAN, input_scale=0.5, raw_scale=255.0, channel_swap=(2, 1, 0))
    assert list(det.crop_dims) == [6, 6, 3]
    a, im_a = _write_png(tmp_path, "a.png", (10, 12, 3))
    b, im_b = _write_png(tmp_path, "b.png", (9, 7, 3))
    windows_a = [np.array([2, 3, 7, 9]), np.array([0, 0, 10, 12])]
    windows_b = [np.array([1, 1, 9, 4])]
    dets = det.detect_windows([(a, windows_a), (b, windows_b)])
    assert [d["filename"] for d in dets] == [a, a, b]
    assert [d["window"] is w for d, w in zip(dets, windows_a + windows_b)] == [True] * 3
    for d, (im, w) in zip(dets, [(im_a, windows_a[0]), (im_a, windows_a[1]), (im_b, windows_b[0])]):
        crop = im[w[0]:w[2], w[1]:w[3]]
        expected = run_one(ref, by_hand(torch_resize(crop, (6, 6))))
        np.testing.assert_allclose(d["prediction"], expected, rtol=1e-4, atol=1e-6)
    assert det.detect_windows([(a, [])]) == []


def test_detector_crop_with_context_pad(model):
    proto, weights, _ = model(batch=1, size=8)
    det = caffe.Detector(proto, weights, mean=MEAN, raw_scale=255.0, channel_swap=(2, 1, 0), context_pad=2)
    im = RNG.random((10, 12, 3)).astype(np.float32)
    # 8 px input, 2 px context: the window grows by 8 / (8 - 4) = 2 about its centre.
    # Window (2, 3, 5, 6): 4x4 around centre (4, 5) -> box (0, 1, 8, 9), 9 px counting both ends,
    # so the crop is im[0:8, 1:9] warped 8 -> round(9 * 8/9) = 8 px: unchanged.
    np.testing.assert_array_equal(det.crop(im, (2, 3, 5, 6)), im[0:8, 1:9])
    # Window (0, 0, 3, 3) around centre (2, 2) -> box (-2, -2, 6, 6): 2 * 8/9 -> 2 px of padding,
    # clipped box (0, 0, 6, 6): 7 * 8/9 -> 6 px, so im[0:6, 0:6] lands at [2:8, 2:8].
    crop = det.crop(im, (0, 0, 3, 3))
    assert crop.shape == (8, 8, 3)
    fill = MEAN[::-1] / 255.0  # the mean taken back to RGB and [0, 1]
    np.testing.assert_allclose(crop[2:8, 2:8], im[0:6, 0:6], rtol=1e-6)
    for region in (crop[:2], crop[:, :2]):
        np.testing.assert_allclose(region, np.broadcast_to(fill, region.shape), rtol=1e-6)
    # Without a mean the context outside the image is 0.
    plain = caffe.Detector(proto, weights, context_pad=2)
    assert np.all(plain.crop(im, (0, 0, 3, 3))[:2] == 0)


def test_detect_selective_search_names_the_missing_module(model, monkeypatch):
    proto, weights, _ = model()
    det = caffe.Detector(proto, weights)
    monkeypatch.setitem(sys.modules, "selective_search_ijcv_with_python", None)
    with pytest.raises(ImportError, match="selective_search_ijcv_with_python"):
        det.detect_selective_search(["x.jpg"])

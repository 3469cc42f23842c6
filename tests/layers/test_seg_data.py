"""The segmentation forks' data and output layers on small generated files: DeepLab v2's
ImageSegData and MatWrite, SegNet's DenseImageData. Expected values come from the arrays the PNG
images were written from (lossless)."""
import numpy as np
import pytest
import torch
from PIL import Image

from recaffe.gradient_check import make_layer
from recaffe.layer import LayerError
from recaffe.layers.image_data import resize_nearest
from recaffe.layers.mat_files import mat_bytes, read_mat
from recaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def make_pairs(tmp_path, sizes, seed=0):
    """RGB images and grey label maps (values 0..4 and 255) of the given (h, w) sizes; returns the
    list file and the (BGR CHW image, label HW) arrays."""
    rng = np.random.default_rng(seed)
    lines, arrays = [], []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        lab = rng.choice(np.array([0, 1, 2, 3, 4, 255], dtype=np.uint8), size=(h, w))
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
        Image.fromarray(lab).save(tmp_path / f"lab{i}.png")
        lines.append(f"im{i}.png lab{i}.png")
        bgr = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1)).astype(float)
        arrays.append((bgr, lab.astype(float)))
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "list.txt"), arrays


def seg_data(tmp_path, source, transform="", extra="", batch_size=1, phase=TEST):
    text = (f'name: "data" type: "ImageSegData" transform_param {{ {transform} }} '
            f'image_data_param {{ source: "{source}" root_folder: "{tmp_path}/" batch_size: {batch_size} '
            f'{extra} }}')
    return make_layer(text, [], num_tops=3, dtype=torch.float32, phase=phase)


def test_image_seg_data_pixel_labels_with_padding_and_centre_crop(tmp_path):
    source, arrays = make_pairs(tmp_path, [(5, 7), (5, 7)])
    layer, _, top = seg_data(tmp_path, source, "crop_size: 6 mean_value: 10 mean_value: 20 mean_value: 30 "
                             "scale: 0.5", "label_type: PIXEL ignore_label: 255", batch_size=2)
    assert [t.shape for t in top] == [(2, 3, 6, 6), (2, 1, 6, 6), (2, 1, 1, 2)]
    layer.run_forward([], top)
    mean = np.array([10, 20, 30.0])[:, None, None]
    for k, (img, lab) in enumerate(arrays):
        # 5x7 padded to 6x7 (bottom row: the mean / ignore), then the centre 6x6 crop: columns 0..5
        padded = np.concatenate([img, np.broadcast_to(mean, (3, 1, 7))], axis=1)
        np.testing.assert_allclose(top[0].data[k], (padded[:, :, 0:6] - mean) * 0.5, rtol=1e-6)
        plab = np.concatenate([lab, np.full((1, 7), 255.0)], axis=0)
        np.testing.assert_array_equal(top[1].data[k, 0], plab[:, 0:6])
        np.testing.assert_array_equal(top[2].data[k].ravel(), [5, 6])


def test_image_seg_data_train_crop_and_mirror_keep_image_and_label_aligned(tmp_path):
    # the label is a function of the image (its first channel): alignment survives any crop/flip
    rng = np.random.default_rng(3)
    img = rng.integers(0, 200, size=(9, 10, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img[..., 2].copy()).save(tmp_path / "a_lab.png")  # = BGR channel 0
    (tmp_path / "list.txt").write_text("a.png a_lab.png\n")
    layer, _, top = seg_data(tmp_path, tmp_path / "list.txt", "crop_size: 4 mirror: true",
                             "label_type: PIXEL", batch_size=4, phase=TRAIN)
    seen = set()
    for _ in range(3):
        layer.run_forward([], top)
        np.testing.assert_array_equal(top[0].data[:, 0], top[1].data[:, 0])
        seen.update(tuple(top[0].data[i, 0].ravel()) for i in range(4))
    assert len(seen) > 1  # random crops/mirrors differ


def test_image_seg_data_label_types(tmp_path):
    source, arrays = make_pairs(tmp_path, [(4, 4)])
    (tmp_path / "none.txt").write_text("im0.png\n")
    (tmp_path / "image.txt").write_text("im0.png 3\n")
    layer, _, top = seg_data(tmp_path, tmp_path / "none.txt", extra="label_type: NONE ignore_label: 77")
    layer.run_forward([], top)
    np.testing.assert_array_equal(top[1].data, 77)
    np.testing.assert_allclose(top[0].data[0], arrays[0][0])
    layer, _, top = seg_data(tmp_path, tmp_path / "image.txt", extra="label_type: IMAGE")
    layer.run_forward([], top)
    np.testing.assert_array_equal(top[1].data, 3)


def test_image_seg_data_errors(tmp_path):
    source, _ = make_pairs(tmp_path, [(4, 4), (5, 4)])
    with pytest.raises(LayerError, match="'data'.*mean_file"):
        seg_data(tmp_path, source, 'mean_file: "m.binaryproto"', "label_type: PIXEL")
    with pytest.raises(LayerError, match="'data'.*new_height and new_width"):
        seg_data(tmp_path, source, "", "label_type: PIXEL new_height: 4")
    (tmp_path / "bad.txt").write_text("im0.png\n")
    with pytest.raises(LayerError, match=r"bad.txt:1: expected '<image path> <label path>'"):
        seg_data(tmp_path, tmp_path / "bad.txt", "", "label_type: PIXEL")
    layer, _, top = seg_data(tmp_path, source, "", "label_type: PIXEL", batch_size=2)
    with pytest.raises(LayerError, match=r"'data'.*list.txt:2: image 'im1.png' gives a 3x5x4 item"):
        layer.run_forward([], top)


def dense_data(tmp_path, source, extra="", transform="", batch_size=1, phase=TRAIN):
    import torch
    text = (f'name: "data" type: "DenseImageData" transform_param {{ {transform} }} '
            f'dense_image_data_param {{ source: "{source}" root_folder: "{tmp_path}/" '
            f'batch_size: {batch_size} {extra} }}')
    return make_layer(text, [], num_tops=2, dtype=torch.float32, phase=phase)


def test_dense_image_data_forward_and_wraparound(tmp_path):
    source, arrays = make_pairs(tmp_path, [(4, 6), (4, 6), (4, 6)])
    layer, _, top = dense_data(tmp_path, source, batch_size=2, transform="mean_value: 100 scale: 2")
    assert [t.shape for t in top] == [(2, 3, 4, 6), (2, 1, 4, 6)]
    for batch in ([0, 1], [2, 0]):
        layer.run_forward([], top)
        for k, i in enumerate(batch):
            np.testing.assert_allclose(top[0].data[k], (arrays[i][0] - 100) * 2, rtol=1e-6)
            np.testing.assert_array_equal(top[1].data[k, 0], arrays[i][1])  # labels are not scaled


def test_dense_image_data_resize_nearest_label_and_random_crop(tmp_path):
    source, arrays = make_pairs(tmp_path, [(6, 8)])
    layer, _, top = dense_data(tmp_path, source, "new_height: 9 new_width: 5")
    layer.run_forward([], top)
    assert top[1].shape == (1, 1, 9, 5)
    rows, cols = [0, 0, 1, 2, 2, 3, 4, 4, 5], [0, 1, 3, 4, 6]  # floor(i * 6 / 9), floor(j * 8 / 5)
    np.testing.assert_array_equal(top[1].data[0, 0], arrays[0][1][rows][:, cols])
    np.testing.assert_array_equal(resize_nearest(np.arange(4.0).reshape(1, 1, 4), 1, 8)[0, 0],
                                  [0, 0, 1, 1, 2, 2, 3, 3])
    # crop + mirror: image channel 0 and label stay aligned
    img = np.random.default_rng(5).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "b.png")
    Image.fromarray(img[..., 2].copy()).save(tmp_path / "b_lab.png")
    (tmp_path / "b.txt").write_text("b.png b_lab.png\n")
    layer, _, top = dense_data(tmp_path, tmp_path / "b.txt", "crop_height: 3 crop_width: 4 mirror: true",
                               batch_size=3)
    layer.run_forward([], top)
    assert top[0].shape == (3, 3, 3, 4)
    np.testing.assert_array_equal(top[0].data[:, 0], top[1].data[:, 0])


def test_dense_image_data_errors(tmp_path):
    source, _ = make_pairs(tmp_path, [(4, 4)])
    with pytest.raises(LayerError, match="'data'.*crop_height and crop_width"):
        dense_data(tmp_path, source, "crop_height: 2")
    with pytest.raises(LayerError, match="'data'.*transform_param mirror/crop_size"):
        dense_data(tmp_path, source, transform="crop_size: 2")
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "mismatch.txt").write_text("im0.png small.png\n")
    with pytest.raises(LayerError, match=r"mismatch.txt:1: label image 'small.png' is 3x4, image 'im0.png'"):
        dense_data(tmp_path, tmp_path / "mismatch.txt")


# ----------------------------------------------------------------------------- MatWrite
def test_mat_write_names_period_and_layout(tmp_path):
    (tmp_path / "ids.txt").write_text("2007_000033.jpg\n2007_000042.jpg\n2007_000061.jpg\n")
    out = tmp_path / "out"
    out.mkdir()
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 5))
    text = (f'type: "MatWrite" mat_write_param {{ prefix: "{out}/" source: "{tmp_path}/ids.txt" strip: 4 '
            f'period: 2 }}')
    layer, bottom, top = make_layer(text, [x, x[:, :1]], num_tops=0)
    for _ in range(3):
        layer.run_forward(bottom, top)
    assert sorted(p.name for p in out.iterdir()) == [
        "2007_000033_blob_0.mat", "2007_000033_blob_1.mat",
        "2007_000061_blob_0.mat", "2007_000061_blob_1.mat"]
    data = read_mat(out / "2007_000033_blob_0.mat")["data"]
    assert data.shape == (5, 4, 3, 1) and data.dtype == np.float64
    np.testing.assert_array_equal(data, x.transpose(3, 2, 1, 0))
    with pytest.raises(LayerError, match="'L'.*forward 4 has no name: the source list holds 3"):
        layer.run_forward(bottom, top)  # forward 3 is skipped by the period, 4 would write
        layer.run_forward(bottom, top)


def test_mat_write_without_source_and_scipy_reads_it(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    import torch
    layer, bottom, top = make_layer(f'type: "MatWrite" mat_write_param {{ prefix: "{tmp_path}/f_" }}', [x],
                                    num_tops=0, dtype=torch.float32)
    layer.run_forward(bottom, top)
    path = tmp_path / "f_iter_0_blob_0.mat"
    assert read_mat(path)["data"].dtype == np.float32
    sio = pytest.importorskip("scipy.io")
    np.testing.assert_array_equal(sio.loadmat(str(path))["data"], x.transpose(3, 2, 1, 0))


def test_mat_bytes_layout():
    raw = mat_bytes("data", np.arange(6, dtype=np.float32), [3, 2])
    assert raw[126:128] == b"IM" and len(raw) % 8 == 0


def test_mat_write_errors(tmp_path):
    x = np.zeros((1, 1, 2, 2))
    with pytest.raises(LayerError, match="'L'.*period must be positive"):
        make_layer('type: "MatWrite" mat_write_param { prefix: "a" period: 0 }', [x], num_tops=0)
    with pytest.raises(LayerError, match="'L'.*failed to open source file"):
        make_layer(f'type: "MatWrite" mat_write_param {{ source: "{tmp_path}/none.txt" }}', [x], num_tops=0)
    (tmp_path / "ids.txt").write_text("ab\n")
    with pytest.raises(LayerError, match="too much stripping"):
        make_layer(f'type: "MatWrite" mat_write_param {{ source: "{tmp_path}/ids.txt" strip: 2 }}', [x],
                   num_tops=0)
    layer, bottom, top = make_layer(f'type: "MatWrite" mat_write_param {{ prefix: "{tmp_path}/no/dir/" }}',
                                    [x], num_tops=0)
    with pytest.raises(LayerError, match="'L'.*cannot write the MAT file"):
        layer.run_forward(bottom, top)

"""Weight fillers: each against its definition (values, ranges, statistics, fan computation)."""
import math

import numpy as np
import pytest

from recaffe import rng
from recaffe.blob import Blob
from recaffe.fillers import fill
from recaffe.io.protofiles import parse_text
from recaffe.proto import caffe_pb2


def filled(shape, text, seed=5):
    rng.set_random_seed(seed)
    b = Blob(shape)
    fill(b, parse_text(text, caffe_pb2.FillerParameter()))
    return b.data.astype("f8")


def test_constant_and_default():
    assert (filled((2, 3), 'type: "constant" value: 2.5') == 2.5).all()
    assert (filled((4,), '') == 0).all()  # default filler: constant 0


def test_uniform_range():
    v = filled((1000,), 'type: "uniform" min: -2 max: 3')
    assert v.min() >= -2 and v.max() <= 3 and abs(v.mean() - 0.5) < 0.2


def test_gaussian_statistics_and_sparse():
    v = filled((200, 100), 'type: "gaussian" mean: 1 std: 2')
    assert abs(v.mean() - 1) < 0.05 and abs(v.std() - 2) < 0.05
    s = filled((50, 400), 'type: "gaussian" std: 1 sparse: 10')  # p(non-zero) = 10 / 50 outputs
    assert abs((s != 0).mean() - 0.2) < 0.02


def test_positive_unitball_rows_sum_to_one():
    v = filled((5, 2, 3), 'type: "positive_unitball"')
    assert (v >= 0).all()
    np.testing.assert_allclose(v.reshape(5, -1).sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("norm,n", [("FAN_IN", 3 * 4 * 5), ("FAN_OUT", 6 * 4 * 5), ("AVERAGE", (60 + 120) / 2)])
def test_xavier_bound_uses_caffes_fans(norm, n):
    v = filled((6, 3, 4, 5), f'type: "xavier" variance_norm: {norm}')
    bound = math.sqrt(3 / n)
    assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound


def test_msra_std():
    v = filled((64, 32, 3, 3), 'type: "msra"')
    assert abs(v.std() - math.sqrt(2 / (32 * 9))) < 0.01 * math.sqrt(2 / (32 * 9)) * 5


def test_bilinear_kernel():
    v = filled((2, 1, 4, 4), 'type: "bilinear"')
    w = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(v[1, 0], np.outer(w, w), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        filled((1, 1, 3, 4), 'type: "bilinear"')


def test_same_seed_same_values_and_unknown_filler():
    a = filled((10,), 'type: "gaussian"', seed=1)
    assert np.array_equal(a, filled((10,), 'type: "gaussian"', seed=1))
    assert not np.array_equal(a, filled((10,), 'type: "gaussian"', seed=2))
    with pytest.raises(ValueError, match="Unknown filler name: 'gausian'"):
        filled((3,), 'type: "gausian"')
    with pytest.raises(ValueError, match="Sparsity not supported"):
        filled((3,), 'type: "uniform" sparse: 2')

"""Python layers (type "Python", caffe.Layer): the call contract pycaffe follows, param_str and
phase, learnable self.blobs, loss weights, errors; and the example Python Euclidean loss against
the built-in EuclideanLoss in training."""
import pathlib
import sys
import textwrap
import uuid

import numpy as np
import pytest

import caffe
from helpers import make_net, net_param
from recaffe.gradient_check import check_gradient, forward_layer
from recaffe.layer import LayerError
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "pycaffe"

LAYERS = '''
import numpy as np
import caffe

LOG = []


class Times10(caffe.Layer):
    """top = 10 * bottom; records every call with what it saw."""

    def setup(self, bottom, top):
        LOG.append(("setup", self.param_str, self.phase, len(bottom), len(top)))

    def reshape(self, bottom, top):
        LOG.append(("reshape", bottom[0].shape))
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        LOG.append(("forward",))
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        LOG.append(("backward", list(propagate_down)))
        bottom[0].diff[...] = 10 * top[0].diff


class Scale(caffe.Layer):
    """top = w * bottom with one learnable scalar w (initial value from param_str)."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = float(self.param_str or 1)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data[0] * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] += np.sum(top[0].diff * bottom[0].data)
        if propagate_down[0]:
            bottom[0].diff[...] = self.blobs[0].data[0] * top[0].diff


class Add(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data + bottom[1].data

    def backward(self, top, propagate_down, bottom):
        LOG.append(("add backward", list(propagate_down)))
        for i in range(2):
            if propagate_down[i]:
                bottom[i].diff[...] = top[0].diff


class Counter(caffe.Layer):
    """A data layer: 0, 1, 2, ... in batches of 4, as pycaffe's own test data layer."""

    def setup(self, bottom, top):
        self.next = 0
        top[0].reshape(4)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        top[0].data[...] = np.arange(self.next, self.next + 4)
        self.next += 4

    def backward(self, top, propagate_down, bottom):
        pass


class SumSquares(caffe.Layer):
    """A loss without a default weight: 0.5 * sum(x^2); checks the blob interface it is given."""

    def setup(self, bottom, top):
        b = bottom[0]
        assert b.count == b.num * b.channels * b.height * b.width == np.prod(b.shape)
        assert b.count(1) == np.prod(b.shape[1:])

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        top[0].data[0] = 0.5 * np.sum(bottom[0].data ** 2)

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff[0] * bottom[0].data


class Fails(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        raise TypeError("boom in forward")


class ReassignsBlobs(caffe.Layer):
    def setup(self, bottom, top):
        self.blobs = []


class NotALayer:
    pass
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A fresh module holding the layers above, importable by its (unique) name."""
    name = "pylayers_" + uuid.uuid4().hex[:8]
    (tmp_path / f"{name}.py").write_text(LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def py(name, cls, bottoms=(), tops=(), extra=""):
    b = "".join(f' bottom: "{x}"' for x in bottoms)
    t = "".join(f' top: "{x}"' for x in tops)
    return f'layer {{ name: "{name}" type: "Python"{b}{t} python_param {{ {cls} }} {extra} }}\n'


def inp(top, *dims):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "in_{top}" type: "Input" top: "{top}" input_param {{ shape {{ {shape} }} }} }}\n'


# ------------------------------------------------------------------------------ the contract
def test_calls_follow_pycaffes_order_with_param_str_and_phase(module):
    mod = __import__(module)
    text = "force_backward: true\n" + inp("data", 2, 3) + py(
        "one", f'module: "{module}" layer: "Times10" param_str: "cfg: 1"', ["data"], ["one"])
    net = make_net(text, caffe.TEST)
    assert mod.LOG == [("setup", "cfg: 1", caffe.TEST, 1, 1), ("reshape", (2, 3))]
    net.blobs["data"].data[...] = 3
    net.forward()
    np.testing.assert_array_equal(net.blobs["one"].data, 30)
    net.blobs["one"].diff[...] = 2
    net.backward()
    np.testing.assert_array_equal(net.blobs["data"].diff, 20)
    assert mod.LOG[2:] == [("reshape", (2, 3)), ("forward",), ("backward", [True])]
    assert net.layer_dict["one"].type == "Python"
    assert net.layer_dict["one"].param_str == "cfg: 1"  # the Python object's attributes show through


def test_chained_layers_forward_backward_and_reshape(module):
    # pycaffe's own test: three x10 layers; reshaping the input reshapes everything.
    text = "force_backward: true\n" + inp("data", 4, 3, 2) + "".join(
        py(n, f'module: "{module}" layer: "Times10"', [b], [n])
        for b, n in [("data", "one"), ("one", "two"), ("two", "three")])
    net = make_net(text)
    net.blobs["data"].data[...] = 8
    net.forward()
    np.testing.assert_array_equal(net.blobs["three"].data, 8000)
    net.blobs["three"].diff[...] = 7
    net.backward()
    np.testing.assert_array_equal(net.blobs["data"].diff, 7000)
    net.blobs["data"].reshape(5, 5, 5, 5)
    net.forward()
    assert all(b.shape == (5, 5, 5, 5) for b in net.blobs.values())


def test_python_data_layer_without_bottoms(module):
    net = make_net(py("counter", f'module: "{module}" layer: "Counter"', [], ["n"]))
    seen = []
    for _ in range(3):
        net.forward()
        seen.append(net.blobs["n"].data.copy())
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(12))


def test_propagate_down_follows_the_nets_backward_analysis(module):
    mod = __import__(module)
    text = inp("x", 2, 3) + inp("y", 2, 2) + (
        'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "h" '
        'inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }\n') \
        + py("add", f'module: "{module}" layer: "Add"', ["h", "y"], ["s"]) \
        + py("loss", f'module: "{module}" layer: "SumSquares"', ["s"], ["loss"], "loss_weight: 1")
    net = make_net(text)
    net.blobs["y"].data[...] = 1
    net.forward()
    net.backward()
    # h comes from a layer with params, y from an Input: only h needs a gradient.
    assert mod.LOG[-1] == ("add backward", [True, False])
    np.testing.assert_array_equal(net.blobs["h"].diff, net.blobs["s"].data)
    assert not net.blobs["y"].diff.any()


def test_loss_weight_is_the_tops_diff_and_scales_loss_and_gradients(module):
    x = np.arange(6, dtype=float).reshape(2, 3) / 4
    text = inp("x", 2, 3) + py("loss", f'module: "{module}" layer: "SumSquares"', ["x"], ["loss"],
                               'loss_weight: 2.5')
    net = make_net("force_backward: true\n" + text)
    net.blobs["x"].data[...] = x
    loss = net.forward_loss()
    assert loss == pytest.approx(2.5 * 0.5 * np.sum(x ** 2), rel=1e-6)
    assert net.blob_loss_weights["loss"] == 2.5
    np.testing.assert_array_equal(net.blobs["loss"].diff, [2.5])
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, 2.5 * x, rtol=1e-6)


def test_python_layers_have_no_default_loss_weight(module):
    net = make_net(inp("x", 2, 3) + py("l", f'module: "{module}" layer: "SumSquares"', ["x"], ["l"]))
    assert net.blob_loss_weights["l"] == 0
    assert net.forward_loss() == 0


def test_gradient_check_through_the_python_layer(module):
    x = np.random.default_rng(0).standard_normal((2, 3, 2))
    check_gradient(f'type: "Python" python_param {{ module: "{module}" layer: "Scale" param_str: "1.5" }}',
                   [x])
    check_gradient(f'type: "Python" python_param {{ module: "{module}" layer: "SumSquares" }} loss_weight: 3',
                   [x])
    (top,) = forward_layer(f'type: "Python" python_param {{ module: "{module}" layer: "Scale" '
                           f'param_str: "-2" }}', [x])
    np.testing.assert_allclose(top, -2 * x, rtol=1e-15)  # float64 blobs in gradient checks


# --------------------------------------------------------------------------- learnable blobs
SCALE_NET = inp("x", 3, 2) + inp("y", 3, 2)


def scale_net(module, extra=""):
    return SCALE_NET + py("s", f'module: "{module}" layer: "Scale" param_str: "2"', ["x"], ["sx"], extra) + \
        'layer { name: "loss" type: "EuclideanLoss" bottom: "sx" bottom: "y" top: "loss" }\n'


def test_blobs_are_net_params_trained_by_solvers_and_saved(module, tmp_path):
    x = np.array([[1, 2], [0, -1], [3, 1]], float)
    y = np.ones((3, 2))
    sp = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", max_iter=3, display=0)
    sp.net_param.CopyFrom(net_param(scale_net(module, "param { lr_mult: 0.5 }")))
    solver = create_solver(sp)
    net = solver.net
    assert list(net.params) == ["s"] and net.params["s"][0].shape == (1,)
    net.blobs["x"].data[...] = x
    net.blobs["y"].data[...] = y
    w = 2.0
    for _ in range(3):
        solver.step(1)
        # d/dw of sum((w x - y)^2) / (2 N), N = 3; the update is lr * lr_mult * gradient.
        grad = np.sum((w * x - y) * x) / 3
        w -= 0.1 * 0.5 * grad
        assert net.params["s"][0].data[0] == pytest.approx(w, rel=1e-6)
    path = tmp_path / "scale.caffemodel"
    net.save(str(path))
    loaded = make_net(scale_net(module), caffe.TEST, weights=str(path))
    assert loaded.params["s"][0].data[0] == pytest.approx(w, rel=1e-6)  # copied over setup's 2.0
    saved = caffe_pb2.NetParameter.FromString(path.read_bytes())
    assert [len(layer.blobs) for layer in saved.layer if layer.name == "s"] == [1]


def test_blobs_are_shared_by_param_name(module):
    text = SCALE_NET + py("a", f'module: "{module}" layer: "Scale"', ["x"], ["ax"], 'param { name: "w" }') \
        + py("b", f'module: "{module}" layer: "Scale" param_str: "2"', ["y"], ["by"], 'param { name: "w" }')
    net = make_net(text)
    assert net.params["a"][0] is net.params["b"][0]
    assert net.layer_dict["b"].blobs is net.params["b"]  # the Python object's list is the net's
    net.blobs["x"].data[...] = 1
    net.blobs["y"].data[...] = 1
    net.forward()
    np.testing.assert_array_equal(net.blobs["by"].data, net.blobs["ax"].data)


def test_blobs_cannot_be_replaced(module):
    with pytest.raises(AttributeError):
        make_net(inp("x", 1) + py("r", f'module: "{module}" layer: "ReassignsBlobs"', ["x"], ["y"]))


def test_add_blob_makes_zero_blobs_of_the_given_shape():
    layer = caffe.Layer(caffe_pb2.LayerParameter())
    layer.blobs.add_blob(2, 3)
    layer.blobs.add_blob()
    assert [b.shape for b in layer.blobs] == [(2, 3), ()]
    assert layer.blobs[0].count == 6 and not layer.blobs[0].data.any()


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("param, words", [
    ('module: "no_such_module_xyz" layer: "X"', ["'no_such_module_xyz'", "ModuleNotFoundError"]),
    ('module: "{m}" layer: "Missing"', ["'{m}'", "no class 'Missing'"]),
    ('module: "{m}" layer: "NotALayer"', ["{m}.NotALayer", "not a subclass of caffe.Layer"]),
    ('module: "{m}" layer: "LOG"', ["not a subclass of caffe.Layer"]),
    ('layer: "X"', ["python_param.module is empty"]),
    ('module: "{m}"', ["python_param.layer is empty"]),
])
def test_bad_python_param_names_the_layer(module, param, words):
    param = param.replace("{m}", module)
    with pytest.raises(LayerError) as err:
        make_net(inp("x", 1) + py("mine", param, ["x"], ["y"]))
    msg = str(err.value)
    assert "Python layer 'mine'" in msg
    for w in words:
        assert w.replace("{m}", module) in msg


def test_module_failing_at_import_reports_the_exception(tmp_path, monkeypatch):
    (tmp_path / "broken_pylayer_mod.py").write_text("import caffe\nx = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LayerError, match=r"Python layer 'b'.*'broken_pylayer_mod'.*ZeroDivisionError"):
        make_net(inp("x", 1) + py("b", 'module: "broken_pylayer_mod" layer: "X"', ["x"], ["y"]))
    sys.modules.pop("broken_pylayer_mod", None)


def test_errors_in_user_code_keep_their_type_and_name_the_layer(module):
    net = make_net(inp("x", 1) + py("f", f'module: "{module}" layer: "Fails"', ["x"], ["y"]))
    with pytest.raises(TypeError, match="boom in forward") as err:
        net.forward()
    if hasattr(err.value, "__notes__"):
        assert any("Python layer 'f'" in note and "forward()" in note for note in err.value.__notes__)


# ---------------------------------------------------------- the example: Python Euclidean loss
EUCLID_NET = inp("x", 4, 3) + inp("y", 4, 2) + textwrap.dedent("""
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "pred"
      inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
    """)
BUILTIN_LOSS = 'layer { name: "loss" type: "EuclideanLoss" bottom: "pred" bottom: "y" top: "loss" }\n'
PYTHON_LOSS = py("loss", 'module: "pyloss" layer: "EuclideanLossLayer"', ["pred", "y"], ["loss"],
                 "loss_weight: 1")


@pytest.fixture
def pyloss(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "layers"))
    yield
    sys.modules.pop("pyloss", None)


def test_example_pyloss_trains_like_the_builtin_euclidean_loss(pyloss):
    g = np.random.default_rng(5)
    x, y = g.standard_normal((4, 3)), g.standard_normal((4, 2))
    runs = {}
    for kind, loss in [("builtin", BUILTIN_LOSS), ("python", PYTHON_LOSS)]:
        sp = caffe_pb2.SolverParameter(base_lr=0.05, momentum=0.9, lr_policy="fixed", random_seed=11,
                                       display=0, weight_decay=0.001)
        sp.net_param.CopyFrom(net_param(EUCLID_NET + loss))
        solver = create_solver(sp)
        net = solver.net
        net.blobs["x"].data[...] = x
        net.blobs["y"].data[...] = y
        net.forward()
        net.backward()
        first = dict(loss=float(net.blobs["loss"].data.reshape(-1)[0]),
                     grads=[p.diff.copy() for p in net.params["ip"]],
                     init=[p.data.copy() for p in net.params["ip"]])
        losses = []
        for _ in range(8):
            solver.step(1)
            losses.append(float(net.blobs["loss"].data.reshape(-1)[0]))
        runs[kind] = first, losses, [p.data.copy() for p in net.params["ip"]]
    (b_first, b_losses, b_params), (p_first, p_losses, p_params) = runs["builtin"], runs["python"]
    for a, b in zip(b_first["init"], p_first["init"]):
        np.testing.assert_array_equal(a, b)  # same seed: same start
    w, bias = b_first["init"]
    expected = np.sum((x @ w.T + bias - y) ** 2) / (2 * 4)
    assert p_first["loss"] == pytest.approx(expected, rel=1e-5)
    assert b_first["loss"] == pytest.approx(expected, rel=1e-5)
    for a, b in zip(b_first["grads"], p_first["grads"]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p_losses, b_losses, rtol=1e-5, atol=1e-7)
    assert p_losses[-1] < p_losses[0]
    for a, b in zip(b_params, p_params):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_example_pyloss_gradients_and_checks(pyloss):
    g = np.random.default_rng(2)
    a, b = g.standard_normal((3, 2, 2)), g.standard_normal((3, 4))
    text = 'type: "Python" python_param { module: "pyloss" layer: "EuclideanLossLayer" } loss_weight: 0.7'
    check_gradient(text, [a, b])
    (loss,) = forward_layer(text, [a, b])
    assert loss[0] == pytest.approx(np.sum((a.reshape(3, 4) - b) ** 2) / 6, rel=1e-12)
    with pytest.raises(ValueError, match="same size"):
        forward_layer(text, [a, g.standard_normal((3, 5))])


def test_example_linreg_prototxt_trains(pyloss, monkeypatch):
    monkeypatch.chdir(EXAMPLE)
    solver = caffe.get_solver("linreg_solver.prototxt")
    solver.step(60)
    assert float(solver.net.blobs["loss"].data[0]) < 0.05

"""Mixed precision (recaffe/precision.py): which layers compute in which type, float32 master
weights, conversions at the boundaries, loss scaling, and the solver's update on the masters."""
import os

import numpy as np
import pytest
import torch

import caffe
from helpers import capture_log, make_net, net_param, write
from recaffe import precision
from recaffe.net import Net
from recaffe.precision import LossScaler, PrecisionError
from recaffe.proto import caffe_pb2

# a small net touching each kind of layer: a data layer (float32), low-precision convolution,
# BatchNorm in place (its input's type, float32 inside), a Scale in place asking for float32 (NVCaffe's
# forward_type: it runs on a converted copy of the bf16 blob), ReLU in place, pooling, inner product,
# and a float32 loss.
NET = """
name: "mp"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" forward_type: FLOAT
        scale_param { bias_term: true filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _inputs(seed=0):
    g = np.random.default_rng(seed)
    return g.standard_normal((4, 3, 8, 8)).astype("f4"), np.array([0, 1, 4, 2], "f4")


def _twin_nets(name, text=NET):
    """An fp32 net and a ``name`` net with the same weights and inputs, forward and backward run."""
    caffe.set_random_seed(3)
    full = make_net(text)
    low = make_net(text, precision=name)
    _copy_params(full, low)
    data, label = _inputs()
    for net in (full, low):
        net.blobs["data"].data[...] = data
        net.blobs["label"].data[...] = label
        net.clear_param_diffs()
        net.forward()
        net.backward()
    return full, low


def _copy_params(src, dst):
    for layer_name, blobs in src.params.items():
        for a, b in zip(blobs, dst.params[layer_name]):
            b.data[...] = a.data


def _rel_err(ours, ref):
    """Largest difference, relative to the largest value."""
    ours, ref = np.asarray(ours, "f8"), np.asarray(ref, "f8")
    return np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6)


def _norm_err(ours, ref):
    """||ours - ref|| / ||ref||: for gradients, where max pooling or ReLU may pick another element
    after rounding (a different argmax moves a whole gradient entry)."""
    ours, ref = np.asarray(ours, "f8").ravel(), np.asarray(ref, "f8").ravel()
    return np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12)


def test_layer_compute_types():
    net = make_net(NET, precision="bf16")
    types = {name: layer.dtype for name, layer in net.layer_dict.items()}
    assert types == {"data": torch.float32, "conv": torch.bfloat16, "bn": torch.bfloat16, "scale": torch.float32,
                     "relu": torch.bfloat16, "pool": torch.bfloat16, "ip": torch.bfloat16, "loss": torch.float32}
    # blobs take their producer's type: the activations between low layers are half the size
    assert {n: b.dtype for n, b in net.blobs.items()} == {
        "data": torch.float32, "label": torch.float32, "conv": torch.bfloat16, "pool": torch.bfloat16,
        "ip": torch.bfloat16, "loss": torch.float32}
    # every param is a float32 master
    assert {b.dtype for blobs in net.params.values() for b in blobs} == {torch.float32}
    # only the layers whose compute type differs from a blob they read run on converted copies
    converted = [net.layer_names[i] for i, c in enumerate(net._casts) if c is not None]
    assert converted == ["conv", "scale", "loss"]


def test_fp32_net_has_no_conversions():
    net = make_net(NET)
    assert net.precision.low is None
    assert all(c is None for c in net._casts)
    assert {b.dtype for b in net.blobs.values()} == {torch.float32}


# Tolerances (docs/precision.md): values within a few units of the type's rounding (bfloat16 keeps 8
# significant bits, float16 11) of the largest value; gradients in norm, looser, since a rounded
# input can move a max-pooling argmax or flip a ReLU, and BatchNorm's backward cancels.
@pytest.mark.parametrize("name, tol, grad_tol", [("bf16", 2 ** -6, 0.15), ("fp16", 2 ** -9, 0.005)])
def test_low_precision_agrees_with_fp32(name, tol, grad_tol):
    full, low = _twin_nets(name)
    assert low.blobs["ip"].dtype == precision.PRECISIONS[name]
    for blob in ("conv", "pool", "ip", "loss"):
        assert _rel_err(low.blobs[blob].data, full.blobs[blob].data) < tol, blob
    for blob in ("ip", "pool", "conv"):
        assert _norm_err(low.blobs[blob].diff, full.blobs[blob].diff) < grad_tol, blob
    for layer_name, blobs in full.params.items():
        for i, (a, b) in enumerate(zip(blobs, low.params[layer_name])):
            assert b.diff.dtype == np.float32
            if layer_name == "bn":  # statistics, updated in forward in float32 from the low-precision conv
                assert _rel_err(b.data, a.data) < tol, (layer_name, i)
            elif (layer_name, i) != ("conv", 1):  # (a bias before BatchNorm has no gradient but rounding)
                assert _norm_err(b.diff, a.diff) < grad_tol, (layer_name, i)


def test_low_precision_results_differ_from_fp32():
    # the comparison above is not vacuous: the low-precision net really rounds
    full, low = _twin_nets("bf16")
    assert not np.array_equal(low.blobs["ip"].data, full.blobs["ip"].data)


def test_bf16_blobs_read_and_write_as_float32_arrays():
    net = make_net(NET, precision="bf16")
    data, label = _inputs()
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label
    net.forward()
    before = net.blobs["pool"].data_t.float().numpy().copy()
    arr = net.blobs["pool"].data  # a float32 mirror, as pycaffe's arrays over GPU blobs
    assert arr.dtype == np.float32
    assert np.array_equal(arr, before)
    arr[...] = 0.5  # an edit of the mirror reaches the next layer
    net.forward(start="ip")
    assert (net.blobs["pool"].data_t == 0.5).all()
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    expected = 0.5 * w.sum(1) + b
    assert np.allclose(net.blobs["ip"].data[0], expected, rtol=2 ** -6, atol=1e-2)
    # each .data refreshes the same host buffer: arrays taken before see the new values
    net.forward()
    again = net.blobs["pool"].data
    assert np.shares_memory(again, arr) and np.array_equal(arr, before)


def test_param_diffs_accumulate_in_float32():
    net = make_net(NET, precision="bf16")
    data, label = _inputs()
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label
    net.clear_param_diffs()
    net.forward()
    net.backward()
    once = net.params["ip"][0].diff.copy()
    net.backward()
    assert net.params["ip"][0].diff.dtype == np.float32
    assert np.array_equal(net.params["ip"][0].diff, once + once)


def _diffs_at_scales(net, scales):
    data, label = _inputs()
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label
    out = {}
    for scale in scales:
        net.loss_scale = scale
        net.clear_param_diffs()
        net.forward()
        net.backward()
        out[scale] = {k: [b.diff.copy() for b in v] for k, v in net.params.items()}
    return out


def test_loss_scale_rescues_float16_gradients_from_underflow():
    # a tiny loss weight: at scale 1 the float16 gradients fall under float16's smallest value
    text = NET.replace('bottom: "label" top: "loss" }', 'bottom: "label" top: "loss" loss_weight: 1e-7 }')
    low, full = make_net(text, precision="fp16"), make_net(text)
    _copy_params(full, low)
    out = _diffs_at_scales(low, (1.0, 2.0 ** 16))
    ref = _diffs_at_scales(full, (1.0,))[1.0]
    lost = _norm_err(out[1.0]["conv"][0], ref["conv"][0])
    kept = _norm_err(out[2.0 ** 16]["conv"][0] / 2 ** 16, ref["conv"][0])
    assert lost > 0.5 and kept < 0.01, (lost, kept)


def test_loss_scale_scales_gradients_exactly_and_not_the_loss():
    net = make_net(NET, precision="bf16")  # (float32's range: no underflow to tell the scales apart)
    data, label = _inputs()
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label
    out = {}
    for scale in (1.0, 8.0):
        net.loss_scale = scale
        net.clear_param_diffs()
        loss = net.forward()["loss"].copy()
        net.backward()
        out[scale] = (loss, {k: [b.diff.copy() for b in v] for k, v in net.params.items()},
                      net.blobs["data"].diff.copy())
        assert net.blobs["loss"].diff[()] == 1  # the loss weight is back in the loss top's diff
    assert out[1.0][0] == out[8.0][0]
    for k, diffs in out[1.0][1].items():
        for a, b in zip(diffs, out[8.0][1][k]):
            assert np.array_equal(b, 8 * a), k  # powers of two scale float16 exactly
    assert np.array_equal(out[8.0][2], 8 * out[1.0][2])


def test_loss_scaler_unscales_skips_and_grows(monkeypatch):
    monkeypatch.setattr(precision, "GROWTH_INTERVAL", 2)
    s = LossScaler(8.0, dynamic=True)
    d = [torch.full((3,), 16.0), torch.full((2,), -8.0)]
    assert s.unscale_(d, 0)
    assert d[0].tolist() == [2.0] * 3 and d[1].tolist() == [-1.0] * 2
    bad = [torch.tensor([1.0, float("inf")])]
    with capture_log() as lines:
        assert not s.unscale_(bad, 1)
    assert bad[0].tolist() == [1.0, float("inf")]  # untouched
    assert s.scale == 4.0 and s.skipped == 1
    assert any("update skipped, loss scale 8 -> 4" in line for line in lines)
    assert s.unscale_([torch.ones(1)], 2) and s.scale == 4.0
    assert s.unscale_([torch.ones(1)], 3) and s.scale == 8.0  # doubled after 2 clean steps
    fixed = LossScaler(4.0, dynamic=False)
    nan = [torch.tensor([float("nan")])]
    assert fixed.unscale_(nan, 0)  # a fixed scale never skips (NVCaffe's global_grad_scale)
    with pytest.raises(PrecisionError):
        LossScaler(0.0, dynamic=False)


def test_nvcaffe_fields_choose_the_layers():
    text = NET.replace('name: "mp"', 'name: "mp"\ndefault_forward_type: FLOAT16\nglobal_grad_scale: 32') \
        .replace('layer { name: "ip" type: "InnerProduct"', 'layer { name: "ip" type: "InnerProduct" forward_type: FLOAT')
    net = make_net(text)
    assert net.precision.name == "fp16" and net.precision.loss_scale == 32 and not net.precision.dynamic
    assert net.loss_scale == 1  # a net of its own: its solver applies the scale
    assert net.layer_dict["conv"].dtype == torch.float16
    assert net.layer_dict["ip"].dtype == torch.float32
    # -precision bf16: the prototxt's FLOAT16 layers compute in bfloat16, its FLOAT layers in float32
    net = make_net(text, precision="bf16")
    assert net.layer_dict["conv"].dtype == torch.bfloat16 and net.layer_dict["ip"].dtype == torch.float32
    # -precision fp32 runs an NVCaffe float16 net in float32 throughout
    net = make_net(text, precision="fp32")
    assert {l.dtype for l in net.layers} == {torch.float32}
    # a layer may ask for FLOAT16 in a float32 net (NVCaffe's per-layer type)
    one = NET.replace('layer { name: "pool" type: "Pooling"', 'layer { name: "pool" type: "Pooling" forward_type: FLOAT16')
    net = make_net(one)
    assert net.layer_dict["pool"].dtype == torch.float16 and net.layer_dict["conv"].dtype == torch.float32
    assert net.precision.dynamic and net.precision.loss_scale == precision.INITIAL_SCALE


def test_adaptive_grad_scale_is_dynamic():
    text = NET.replace('name: "mp"', 'name: "mp"\ndefault_forward_type: FLOAT16\nglobal_grad_scale: 1024\n'
                       'global_grad_scale_adaptive: true')
    net = make_net(text)
    assert net.precision.loss_scale == 1024 and net.precision.dynamic


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(PrecisionError, match="unknown precision 'fp64': expected one of fp32, bf16, fp16"):
        make_net(NET, precision="fp64")


def test_set_precision_applies_to_new_nets():
    caffe.set_precision("bf16")
    try:
        net = make_net(NET)
    finally:
        caffe.set_precision(None)
    assert net.layer_dict["conv"].dtype == torch.bfloat16
    assert make_net(NET).layer_dict["conv"].dtype == torch.float32


SOLVER = """
base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01 display: 0 max_iter: 10
random_seed: 5 snapshot_after_train: false
"""


def _solver(tmp_path, precision_name, net_text=NET, dummy=True):
    if dummy:
        net_text = net_text.replace(
        'layer { name: "data" type: "Input" top: "data" top: "label"\n        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }',
        'layer { name: "data" type: "DummyData" top: "data" top: "label" dummy_data_param {\n'
        '  shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 }\n'
        '  data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 4.99 } } }')
    net = write(tmp_path, "net.prototxt", net_text)
    caffe.set_precision(precision_name)
    try:
        return caffe.get_solver(write(tmp_path, "solver.prototxt", f'net: "{net}"\n' + SOLVER))
    finally:
        caffe.set_precision(None)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_solver_step_is_the_documented_loop_on_float32_masters(tmp_path, name):
    """What solver.step() does in low precision, reproduced by docs/semantics.md's hand-written
    loop: forward/backward in the net's types, then Caffe's update on the float32 params. With
    fp16 the loop also scales the loss: diffs divided by the scale, or, when they overflowed, no
    update and half the scale."""
    from test_solver_by_hand import documented_recipe
    update_by_hand = documented_recipe()
    solver = _solver(tmp_path, name, dummy=False)
    twin = _solver(tmp_path, name, dummy=False)
    net, p, hist = twin.net, twin.param, {}
    scale = solver.loss_scaler.scale if solver.loss_scaler else 1.0
    assert (scale == precision.INITIAL_SCALE) == (name == "fp16")
    updates = 0
    for it in range(8):
        data, label = _inputs(it)
        for n in (solver.net, net):
            n.blobs["data"].data[...] = data
            n.blobs["label"].data[...] = label
        before = solver.net.params["ip"][0].data.copy()
        solver.step(1)
        net.clear_param_diffs()
        net.loss_scale = scale
        net.forward()
        net.backward()
        if all(np.isfinite(b.diff).all() for b in net.learnable_params):
            for b in net.learnable_params:
                b.diff[...] /= scale
            update_by_hand(net, p, p.base_lr, it, hist)
            assert not np.array_equal(solver.net.params["ip"][0].data, before)
            updates += 1
        else:
            scale /= 2
            assert np.array_equal(solver.net.params["ip"][0].data, before)
        assert solver.loss_scaler is None or solver.loss_scaler.scale == scale
        for k, blobs in solver.net.params.items():
            for a, b in zip(blobs, net.params[k]):
                assert a.data.dtype == np.float32
                np.testing.assert_allclose(b.data, a.data, rtol=1e-5, atol=1e-7, err_msg=f"{k} step {it}")
    assert updates >= 3


def test_fp16_solver_skips_an_overflowing_update(tmp_path):
    text = NET.replace('name: "mp"', 'name: "mp"\nglobal_grad_scale: 1099511627776\n'  # 2^40
                       'global_grad_scale_adaptive: true')
    solver = _solver(tmp_path, "fp16", text)
    before = solver.net.params["ip"][0].data.copy()
    with capture_log() as lines:
        solver.step(1)
    assert solver.iter == 1
    assert np.array_equal(solver.net.params["ip"][0].data, before)  # no update from inf diffs
    assert solver.loss_scaler.scale == 2.0 ** 39 and solver.loss_scaler.skipped == 1
    assert any("float16 gradients overflowed: update skipped" in line for line in lines)
    for _ in range(40):  # the scale halves until float16 holds the gradients, then training proceeds
        solver.step(1)
        if not np.array_equal(solver.net.params["ip"][0].data, before):
            break
    assert not np.array_equal(solver.net.params["ip"][0].data, before)
    assert np.isfinite(solver.net.params["ip"][0].data).all()


def test_low_precision_training_learns_like_fp32(tmp_path):
    """One fixed batch, 15 steps: each precision fits it (fp16 after skipping its overflowing
    first steps), and bf16 ends near fp32."""
    final = {}
    for name in ("fp32", "bf16", "fp16"):
        solver = _solver(tmp_path, name, dummy=False)
        data, label = _inputs(7)
        solver.net.blobs["data"].data[...] = data
        solver.net.blobs["label"].data[...] = label
        first = solver.net.forward()["loss"].item()
        solver.step(15)
        final[name] = solver.net.forward()["loss"].item()
        assert final[name] < 0.5 * first, (name, first, final[name])
    assert abs(final["bf16"] - final["fp32"]) < 0.2 * final["fp32"] + 0.02, final


def test_snapshot_keeps_float32_masters(tmp_path):
    solver = _solver(tmp_path, "bf16")
    solver.step(2)
    path = str(tmp_path / "w.caffemodel")
    solver.net.save(path)
    again = Net(net_param(NET), caffe_pb2.TEST, weights=path)
    for k, blobs in solver.net.params.items():
        for a, b in zip(blobs, again.params[k]):
            assert np.array_equal(a.data, b.data), k


# ------------------------------------------------------------------ the real Caffe's layer cases
def _layer_cases():
    from test_reference_cases import FORK_CASES, LAYER_CASES
    return [("layers", c) for c in LAYER_CASES] + [("forks", f"{f}/{c}") for f, c in FORK_CASES]


def _low_check(name):
    """Caffe's float32 outputs against a low-precision run: values within a few roundings of the
    type (relative to the array's largest value), gradients in norm (see _norm_err)."""
    tol = {"bf16": 2 ** -6, "fp16": 2 ** -9}[name]

    def check(ours, ref, rtol, atol, what):
        ours, ref = np.asarray(ours, "f8"), np.asarray(ref, "f8")
        assert ours.shape == ref.shape, what
        if "diff" in what:
            err = _norm_err(ours, ref)
            assert err < 16 * tol + atol, f"{what}: norm error {err:.3g}"
        else:
            err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1.0)
            assert err < 4 * tol + atol, f"{what}: error {err:.3g} of the largest value"
    return check


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("where, case", _layer_cases(), ids=[f"{w}/{c}" for w, c in _layer_cases()])
def test_reference_case_in_low_precision(where, case, name):
    """Every layer case the real Caffe (and the forks) produced, run in bf16/fp16: the layers that
    compute in the low type agree within its rounding; the others are float32 and exact as ever."""
    from conftest import require_reference
    from test_reference_cases import assert_close, run_layer_case
    d = require_reference(where, *case.split("/"))
    caffe.set_precision(name)
    try:
        net = run_layer_case(d, check=_low_check(name))
    finally:
        caffe.set_precision(None)
    layer = net.layers[-1]
    if layer.type in precision.LOW_PRECISION_TYPES:
        assert layer.dtype == precision.PRECISIONS[name]
    elif layer.type not in precision.INHERIT_TYPES:
        assert layer.dtype == torch.float32
        run_layer_case(d, check=assert_close)  # (and the float32 path is unchanged)


# ------------------------------------------------------------------ the command and the fast path
@pytest.fixture
def restore_precision(monkeypatch):
    # (setenv, not delenv: monkeypatch then removes the variable -precision sets, at teardown, so
    # later tests' worker processes do not inherit bf16)
    monkeypatch.setenv(precision.PRECISION_ENV, "")
    yield
    caffe.set_precision(None)


def test_caffe_train_precision_flag(tmp_path, monkeypatch, restore_precision):
    from recaffe.cli.main import main
    monkeypatch.chdir(tmp_path)
    _solver(tmp_path, "fp32")  # writes net.prototxt
    write(tmp_path, "cli.prototxt", 'net: "net.prototxt" base_lr: 0.05 lr_policy: "fixed" max_iter: 10 '
          'snapshot_prefix: "solver"')
    with capture_log() as lines:
        assert main(["train", "-solver=cli.prototxt", "-precision=bf16"]) == 0
    assert "Precision: bf16 (float32 master weights)" in lines
    assert any(ln.startswith("Mixed precision: bfloat16 compute, float32 master weights") for ln in lines)
    assert "Optimization Done." in lines
    assert os.environ[precision.PRECISION_ENV] == "bf16"  # (for multi-GPU workers)
    w = caffe.Net("net.prototxt", caffe.TEST, weights="solver_iter_10.caffemodel").params["ip"][0].data
    assert w.dtype == np.float32 and np.isfinite(w).all()


def test_caffe_precision_flag_rejects_unknown_names(capsys, restore_precision):
    from recaffe.cli.main import main
    assert main(["train", "-solver=x", "-precision=fp8"]) == 1
    assert "unknown precision 'fp8': expected one of fp32, bf16, fp16" in capsys.readouterr().err


def test_compiled_fast_path_runs_mixed_precision_nets():
    eager = make_net(NET, precision="bf16")
    compiled = make_net(NET, precision="bf16")
    _copy_params(eager, compiled)
    compiled.set_compile("always")
    data, label = _inputs()
    for _ in range(3):
        for net in (eager, compiled):
            net.blobs["data"].data[...] = data
            net.blobs["label"].data[...] = label
            net.clear_param_diffs()
            net.forward()
            net.backward()
    summary = compiled.fastpath.summary()
    assert any(s["choice"] == "compiled" for s in summary)
    # the layers that convert types run eagerly; the rest compiled, within float rounding of eager
    converting = {compiled.layer_names[i] for i, c in enumerate(compiled._casts) if c is not None}
    assert converting == {"conv", "scale", "loss"}
    assert all(not converting & set(s["layers"]) for s in summary)
    assert _rel_err(compiled.blobs["ip"].data, eager.blobs["ip"].data) < 2 ** -7
    assert _norm_err(compiled.params["conv"][0].diff, eager.params["conv"][0].diff) < 2 ** -5


def test_exported_torch_module_runs_under_autocast(tmp_path):
    """`caffe export --format torch` modules run in bfloat16 too (MAX pooling's explicit padding
    used to be -FLT_MAX, which bfloat16 cannot hold)."""
    from recaffe.export.torch_export import export_torch, load_torch_module
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
    layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
            pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
    layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
            inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } } }
    """
    net = make_net(text, caffe_pb2.TEST)
    data, _ = _inputs()
    net.blobs["data"].data[...] = data
    ref = net.forward(end="ip")["ip"].copy()
    py, _ = export_torch(net, str(tmp_path / "m"))
    module = load_torch_module(py)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(torch.from_numpy(data))
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.bfloat16
    assert _rel_err(out.float().numpy(), ref) < 2 ** -5


def test_caffe_time_runs_layers_through_their_conversions(tmp_path, monkeypatch, restore_precision):
    from recaffe.cli.main import main
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "net.prototxt", NET)
    with capture_log() as lines:
        assert main(["time", "-model=net.prototxt", "-iterations=2", "-precision=bf16"]) == 0
    assert any(ln.startswith("Average Forward-Backward: ") for ln in lines)
    assert any(ln.strip().startswith("conv\tforward: ") for ln in lines)


# ------------------------------------------------------------- every low-precision type, forward and backward
_IN = 'layer {{ name: "in{i}" type: "Input" top: "b{i}" input_param {{ shape {{ {dims} }} }} }}\n'
# type -> (bottom shapes, the layer's params); each runs in bf16 against float32 with the same weights
LOW_TYPE_CASES = {
    "DepthwiseConvolution": ([(2, 4, 6, 6)], 'convolution_param { num_output: 4 group: 4 kernel_size: 3 '
                             'weight_filler { type: "gaussian" std: 0.5 } }'),
    "ConvolutionDepthwise": ([(2, 4, 6, 6)], 'convolution_param { num_output: 4 kernel_size: 3 '
                             'weight_filler { type: "gaussian" std: 0.5 } }'),
    "ReLU6": ([(2, 3, 4)], ""), "AbsVal": ([(2, 3, 4)], ""), "BNLL": ([(2, 3, 4)], ""),
    "Exp": ([(2, 3, 4)], ""), "Swish": ([(2, 3, 4)], ""), "Threshold": ([(2, 3, 4)], ""),
    "Clip": ([(2, 3, 4)], "clip_param { min: -0.5 max: 0.5 }"),
    "Log": ([(2, 3, 4)], "log_param { shift: 10 }"),
    "Bias": ([(2, 3, 4)], 'bias_param { filler { type: "gaussian" std: 1 } }'),
    "Crop": ([(2, 3, 6, 6), (2, 3, 4, 4)], "crop_param { axis: 2 offset: 1 }"),
    "ShuffleChannel": ([(2, 6, 3, 3)], "shuffle_channel_param { group: 3 }"),
    "Axpy": ([(2, 3, 1, 1), (2, 3, 4, 4), (2, 3, 4, 4)], ""),
    "Tile": ([(2, 3, 2)], "tile_param { axis: 1 tiles: 3 }"),
    "Reorg": ([(2, 4, 4, 4)], "reorg_param { stride: 2 }"),
}


def test_every_low_precision_type_is_covered_here_or_by_a_reference_case():
    covered = set(LOW_TYPE_CASES) | {"Convolution", "Deconvolution", "InnerProduct", "Pooling", "ReLU", "PReLU",
                                     "ELU", "Sigmoid", "TanH", "Power", "Concat", "Eltwise", "Scale", "Permute",
                                     "Interp", "Upsample"}  # (the real Caffe's and the forks' layer cases)
    assert set(precision.LOW_PRECISION_TYPES) <= covered, set(precision.LOW_PRECISION_TYPES) - covered


@pytest.mark.parametrize("type_name", sorted(LOW_TYPE_CASES))
def test_low_precision_type_forward_and_backward(type_name):
    shapes, params = LOW_TYPE_CASES[type_name]
    backward = type_name != "Threshold"  # (Caffe's Threshold has no backward)
    text = ("force_backward: true\n" if backward else "") + "".join(
        _IN.format(i=i, dims=" ".join(f"dim: {d}" for d in s)) for i, s in enumerate(shapes))
    text += (f'layer {{ name: "L" type: "{type_name}" ' + " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
             + f' top: "t" {params} }}\n')
    nets = {}
    g = np.random.default_rng(1)
    inputs = [g.standard_normal(s).astype("f4") for s in shapes]
    for name in ("fp32", "bf16"):
        caffe.set_random_seed(2)
        net = make_net(text, precision=name)
        if nets:
            _copy_params(nets["fp32"], net)
        for i, x in enumerate(inputs):
            net.blobs[f"b{i}"].data[...] = x
        net.forward()
        net.blobs["t"].diff[...] = np.linspace(-1, 1, net.blobs["t"].count()).reshape(net.blobs["t"].shape)
        net.clear_param_diffs()
        if backward:
            net.backward()
        nets[name] = net
    full, low = nets["fp32"], nets["bf16"]
    assert low.layer_by_name("L").dtype == torch.bfloat16
    assert _rel_err(low.blobs["t"].data, full.blobs["t"].data) < 2 ** -6
    for i in range(len(shapes) if backward else 0):
        assert _norm_err(low.blobs[f"b{i}"].diff, full.blobs[f"b{i}"].diff) < 2 ** -5, i
    for a, b in zip(full.layer_by_name("L").blobs, low.layer_by_name("L").blobs):
        assert b.diff.dtype == np.float32 and _norm_err(b.diff, a.diff) < 2 ** -5


def test_pycaffe_net_takes_a_precision(tmp_path):
    path = write(tmp_path, "net.prototxt", NET)
    net = caffe.Net(path, caffe.TEST, precision="bf16")
    assert net.layer_dict["conv"].dtype == torch.bfloat16
    assert net.params["conv"][0].data.dtype == np.float32
    assert caffe.Net(path, caffe.TEST).layer_dict["conv"].dtype == torch.float32

"""Net construction and execution with Caffe's semantics."""
import numpy as np
import pytest

from helpers import capture_log, make_net, net_param, write
from recaffe.layer import LayerError
from recaffe.net import Net, WeightsError
from recaffe.proto import caffe_pb2

INPUT = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }\n'
LABEL = 'layer { name: "lab" type: "Input" top: "y" input_param { shape { dim: 4 dim: 2 } } }\n'


def ip(name, bottom, top, n=2, extra=""):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {extra} '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.5 }} '
            'bias_filler { type: "gaussian" std: 0.5 } } }\n')


def euclid(name, a, b, top="loss", extra=""):
    return f'layer {{ name: "{name}" type: "EuclideanLoss" bottom: "{a}" bottom: "{b}" top: "{top}" {extra} }}\n'


def fill_inputs(net, seed=0):
    g = np.random.default_rng(seed)
    for name in net.inputs:
        net.blobs[name].data[...] = g.standard_normal(net.blobs[name].shape)


def test_split_layers_are_inserted_with_caffe_names_and_sum_gradients():
    text = INPUT + LABEL + ip("a", "x", "h", 2) + ip("b", "h", "o1") + ip("c", "h", "o2") \
        + euclid("l1", "o1", "y", "loss1") + euclid("l2", "o2", "y", "loss2")
    net = make_net(text)
    names = net.layer_names
    assert "h_a_0_split" in names and "y_lab_0_split" in names
    assert net.top_names["h_a_0_split"] == ["h_a_0_split_0", "h_a_0_split_1"]
    fill_inputs(net)
    net.forward()
    net.clear_param_diffs()
    net.backward()
    # dL/dh = dL1/dh + dL2/dh: compare with the two branches' diffs computed from their own weights
    d1 = net.blobs["o1"].diff @ net.params["b"][0].data
    d2 = net.blobs["o2"].diff @ net.params["c"][0].data
    np.testing.assert_allclose(net.blobs["h"].diff, d1 + d2, rtol=1e-5, atol=1e-6)


def test_in_place_layer_shares_the_blob():
    net = make_net(INPUT + ip("a", "x", "h") + 'layer { name: "r" type: "ReLU" bottom: "h" top: "h" }')
    assert net.top_names["r"] == ["h"] and list(net.blobs) == ["x", "h"]
    fill_inputs(net)
    net.forward()
    assert (net.blobs["h"].data >= 0).all()


def test_netstate_rules_filter_layers_by_phase_level_and_stage():
    text = INPUT + (
        'layer { name: "train_only" type: "ReLU" bottom: "x" top: "t1" include { phase: TRAIN } }\n'
        'layer { name: "test_only" type: "ReLU" bottom: "x" top: "t2" include { phase: TEST } }\n'
        'layer { name: "deep" type: "ReLU" bottom: "x" top: "t3" include { min_level: 2 } }\n'
        'layer { name: "staged" type: "ReLU" bottom: "x" top: "t4" include { stage: "deploy" } }\n'
        'layer { name: "not_staged" type: "ReLU" bottom: "x" top: "t5" exclude { stage: "deploy" } }\n')
    with capture_log() as lines:
        net = make_net(text, caffe_pb2.TRAIN)
    assert set(net.layer_names) == {"in", "x_in_0_split", "train_only", "not_staged"}
    assert "The NetState phase (0) differed from the phase (1) specified by a rule in layer test_only" in lines
    net = Net(net_param(text), caffe_pb2.TEST, level=3, stages=["deploy"])
    assert set(net.layer_names) == {"in", "x_in_0_split", "test_only", "deep", "staged"}


def test_include_and_exclude_together_is_an_error():
    with pytest.raises(LayerError, match="either include rules or exclude rules"):
        make_net(INPUT + 'layer { name: "r" type: "ReLU" bottom: "x" top: "r" include { phase: TRAIN } '
                 'exclude { phase: TEST } }')


def test_backward_analysis_lr_mult_zero_and_log_lines():
    frozen = 'param { lr_mult: 0 } param { lr_mult: 0 }'
    text = INPUT + LABEL + ip("a", "x", "h", 3, frozen) + ip("b", "h", "o") + euclid("loss", "o", "y")
    with capture_log() as lines:
        net = make_net(text)
    assert "a does not need backward computation." in lines
    assert "b needs backward computation." in lines
    assert "loss needs backward computation." in lines
    assert "in does not need backward computation." in lines
    fill_inputs(net)
    net.forward()
    net.backward()
    assert not net.params["a"][0].diff.any()  # frozen: nothing accumulated
    assert net.params["b"][0].diff.any()


def test_propagate_down_false_stops_gradient_to_that_bottom_only():
    text = INPUT + LABEL + ip("a", "x", "h") + ip("b", "h", "o", extra="propagate_down: false") \
        + euclid("loss", "o", "y")
    with capture_log() as lines:
        net = make_net(text)
    # b still learns its own params; a gets no gradient, so it is skipped.
    assert "b needs backward computation." in lines
    assert "a does not need backward computation." in lines
    fill_inputs(net)
    net.forward()
    net.backward()
    assert net.params["b"][0].diff.any() and not net.params["a"][0].diff.any()


def test_force_backward_reaches_inputs_but_not_labels():
    text = "force_backward: true\n" + INPUT + ip("a", "x", "o", 3) \
        + 'layer { name: "lab" type: "Input" top: "y" input_param { shape { dim: 4 } } }\n' \
        + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "o" bottom: "y" top: "loss" }\n'
    plain = make_net(text.replace("force_backward: true", ""))
    assert plain.bottom_need_backward[plain.layer_names.index("a")] == [False]
    net = make_net(text)
    assert net.bottom_need_backward[net.layer_names.index("loss")] == [True, False]  # labels refused
    assert net.bottom_need_backward[net.layer_names.index("a")] == [True]
    fill_inputs(net)
    net.blobs["y"].data[...] = [0, 1, 2, 1]
    net.forward()
    net.backward()
    assert net.blobs["x"].diff.any()  # gradient flows to the net input


def test_layers_not_reaching_a_loss_are_skipped():
    text = INPUT + LABEL + ip("a", "x", "o") + euclid("loss", "o", "y") + ip("side", "x", "z")
    with capture_log() as lines:
        make_net(text)
    assert "side does not need backward computation." in lines


def test_param_diffs_accumulate_until_cleared():
    net = make_net(INPUT + LABEL + ip("a", "x", "o") + euclid("loss", "o", "y"))
    fill_inputs(net)
    net.forward()
    net.backward()
    once = net.params["a"][0].diff.copy()
    net.forward()
    net.backward()
    np.testing.assert_allclose(net.params["a"][0].diff, 2 * once, rtol=1e-6)
    net.clear_param_diffs()
    assert not net.params["a"][0].diff.any()


def test_shared_params_are_one_blob_and_accumulate_both_uses():
    share = 'param { name: "w" } param { name: "bias" }'
    text = INPUT + LABEL + ip("a", "x", "o1", extra=share) + ip("b", "x", "o2", extra=share) \
        + euclid("l1", "o1", "y", "loss1") + euclid("l2", "o2", "y", "loss2")
    with capture_log() as lines:
        net = make_net(text)
    assert "Sharing parameters 'w' owned by layer 'a', param index 0" in lines
    assert net.params["a"][0] is net.params["b"][0]
    assert len(net.learnable_params) == 2
    fill_inputs(net)
    net.forward()
    net.backward()
    x = net.blobs["x"].data
    expected = net.blobs["o1"].diff.T @ x + net.blobs["o2"].diff.T @ x
    np.testing.assert_allclose(net.params["a"][0].diff, expected, rtol=1e-5, atol=1e-6)


def test_loss_weight_scales_loss_and_gradient():
    base = INPUT + LABEL + ip("a", "x", "o")
    n1 = make_net(base + euclid("loss", "o", "y"))
    n2 = make_net(base + euclid("loss", "o", "y", extra="loss_weight: 3"))
    for n in (n1, n2):
        fill_inputs(n)
    n2.params["a"][0].data[...] = n1.params["a"][0].data
    n2.params["a"][1].data[...] = n1.params["a"][1].data
    l1, l2 = n1.forward_loss(), n2.forward_loss()
    assert l2 == pytest.approx(3 * l1, rel=1e-6)
    assert n2.blob_loss_weights["loss"] == 3
    n1.backward()
    n2.backward()
    np.testing.assert_allclose(n2.params["a"][0].diff, 3 * n1.params["a"][0].diff, rtol=1e-5)


def test_forward_returns_outputs_and_accepts_inputs():
    net = make_net(INPUT + ip("a", "x", "o"), caffe_pb2.TEST)
    x = np.ones((4, 3), "f4")
    out = net.forward(x=x)
    w, b = net.params["a"][0].data, net.params["a"][1].data
    np.testing.assert_allclose(out["o"], x @ w.T + b, rtol=1e-6)
    with pytest.raises(ValueError, match="not batch sized"):
        net.forward(x=np.ones((3, 3)))


def test_forward_from_to_and_reshape():
    net = make_net(INPUT + ip("a", "x", "h", 5) + 'layer { name: "r" type: "ReLU" bottom: "h" top: "r" }',
                   caffe_pb2.TEST)
    net.blobs["x"].reshape(7, 3)
    net.reshape()
    assert net.blobs["r"].shape == (7, 5)
    fill_inputs(net)
    out = net.forward(end="a")
    assert set(out) == {"h"}
    net.blobs["h"].data[...] = -1
    net.forward(start="r")
    assert (net.blobs["r"].data == 0).all()


def test_numpy_views_of_params_see_updates_and_writes_are_seen():
    net = make_net(INPUT + ip("a", "x", "o"), caffe_pb2.TEST)
    w = net.params["a"][0].data
    w[...] = 0
    net.params["a"][1].data[...] = 2
    fill_inputs(net)
    assert (net.forward()["o"] == 2).all()
    net.params["a"][0].diff[...] = 1
    net.update()
    assert (w == -1).all()  # the view taken before the update sees it


def test_save_and_copy_from_round_trip(tmp_path):
    text = INPUT + ip("a", "x", "h") + ip("b", "h", "o")
    net = make_net(text, caffe_pb2.TEST)
    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    other = make_net(text, caffe_pb2.TEST)
    other.copy_from(path)
    for name in ("a", "b"):
        for mine, theirs in zip(net.params[name], other.params[name]):
            assert np.array_equal(mine.data, theirs.data)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file + rename


def test_copy_from_ignores_unknown_layers_and_names_shape_mismatch(tmp_path):
    src = make_net(INPUT + ip("a", "x", "h", 4) + ip("extra", "h", "z"), caffe_pb2.TEST)
    path = str(tmp_path / "w.caffemodel")
    src.save(path)
    dst = make_net(INPUT + ip("a", "x", "h", 4), caffe_pb2.TEST)
    with capture_log() as lines:
        dst.copy_from(path)
    assert "Ignoring source layer extra" in lines
    bad = make_net(INPUT + ip("a", "x", "h", 5), caffe_pb2.TEST)
    with pytest.raises(WeightsError) as e:
        bad.copy_from(path)
    msg = str(e.value)
    assert "layer 'a'" in msg and "4 3 (12)" in msg and "5 3 (15)" in msg


def test_truncated_caffemodel_is_reported(tmp_path):
    net = make_net(INPUT + ip("a", "x", "h", 40), caffe_pb2.TEST)
    path = tmp_path / "w.caffemodel"
    net.save(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        net.copy_from(str(path))


def test_unknown_bottom_is_an_error_naming_layer_and_blob():
    with pytest.raises(LayerError, match="Unknown bottom blob 'nope' \\(layer 'r', bottom index 0\\)"):
        make_net(INPUT + 'layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }')


def test_unknown_layer_type_lists_close_matches():
    with pytest.raises(LayerError) as e:
        make_net(INPUT + 'layer { name: "c" type: "Convolutoin" bottom: "x" top: "c" }')
    assert "Convolutoin" in str(e.value) and "Did you mean: Convolution" in str(e.value)


def test_top_produced_twice_is_an_error():
    with pytest.raises(LayerError, match="produced by multiple sources"):
        make_net(INPUT + 'layer { name: "r" type: "ReLU" bottom: "x" top: "z" }'
                 'layer { name: "s" type: "ReLU" bottom: "x" top: "z" }')


def test_shape_mismatch_names_layer_and_shapes():
    text = INPUT + 'layer { name: "in2" type: "Input" top: "x2" input_param { shape { dim: 4 dim: 5 } } }' \
        + 'layer { name: "cat" type: "Eltwise" bottom: "x" bottom: "x2" top: "s" }'
    with pytest.raises(LayerError) as e:
        make_net(text)
    assert "cat" in str(e.value) and "(4, 3)" in str(e.value) and "(4, 5)" in str(e.value)


def test_malformed_prototxt_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "bad.prototxt", 'name: "x"\nlayer {\n  name: "a"\n  botom: "x"\n}\n')
    with pytest.raises(ValueError) as e:
        Net(path, caffe_pb2.TEST)
    assert str(e.value).startswith(f"{path}:4:3: ") and "botom" in str(e.value)


def test_legacy_input_fields_become_an_input_layer():
    net = make_net('input: "data" input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5\n'
                   'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }', caffe_pb2.TEST)
    assert net.inputs == ["data"] and net.blobs["data"].shape == (2, 3, 4, 5)


def test_atomic_writes_keep_the_old_file_on_failure_and_use_normal_permissions(tmp_path):
    import os
    import stat

    from recaffe.io.hdf5_weights import write_hdf5_atomically
    from recaffe.io.protofiles import atomic_write

    path = tmp_path / "w.caffemodel"
    atomic_write(path, b"old")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0600

    def failing(f):
        f.create_dataset("x", data=np.zeros(3))
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        write_hdf5_atomically(str(path), failing)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.caffemodel"]  # no temp file left
    h5 = tmp_path / "w.h5"
    write_hdf5_atomically(str(h5), lambda f: f.create_dataset("x", data=np.ones(2)))
    assert stat.S_IMODE(os.stat(h5).st_mode) == 0o666 & ~umask

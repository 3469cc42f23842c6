"""Bad input gets a clear recaffe error naming the file, line, layer or setting, never a raw
exception; and nothing bad is accepted silently (issue 12, items 4 and 5)."""
import math
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from helpers import capture_log, write

from recaffe.blob import Blob, BlobError
from recaffe.cli.main import main
from recaffe.errors import RecaffeError
from recaffe.io.netfiles import read_net_text, read_solver_text
from recaffe.io.protofiles import ProtoFileError, decode_text, parse_text
from recaffe.layer import LayerError
from recaffe.net import Net, WeightsError
from recaffe.proto import caffe_pb2
from recaffe.solvers import SolverError, create_solver
from recaffe.solvers.lr_policies import LearningRateError, learning_rate

INPUT = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }\n'
IP_NET = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
          'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }\n')
LOSS_NET = ('layer { name: "d" type: "DummyData" top: "x" top: "y" dummy_data_param { shape { dim: 4 dim: 3 } '
            'shape { dim: 4 dim: 2 } data_filler { type: "gaussian" } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o" inner_product_param { num_output: 2 '
            'weight_filler { type: "gaussian" std: 0.1 } } }\n'
            'layer { name: "loss" type: "EuclideanLoss" bottom: "o" bottom: "y" top: "loss" }\n')


def net_from(tmp_path, text, name="net.prototxt", phase=caffe_pb2.TEST, **kw):
    return Net(write(tmp_path, name, text), phase, **kw)


# ------------------------------------------------------------------ prototxt reading (item 5)
def test_non_repeated_field_given_twice_is_rejected_with_file_line_col(tmp_path):
    path = write(tmp_path, "net.prototxt", INPUT + 'layer {\n  name: "a"\n  name: "b"\n  type: "ReLU" }\n')
    with pytest.raises(ProtoFileError, match=r'net\.prototxt:4:\d+: Non-repeated field "name" is specified '
                                              r'multiple times'):
        read_net_text(path)
    path = write(tmp_path, "s.prototxt", 'base_lr: 0.1\nmax_iter: 3\nbase_lr: 0.2\n')
    with pytest.raises(ProtoFileError, match=r's\.prototxt:3:\d+: Non-repeated field "base_lr"'):
        read_solver_text(path)
    # a message field given twice too, as protobuf's C++ parser
    with pytest.raises(ProtoFileError, match='"convolution_param" is specified multiple times'):
        parse_text('layer { convolution_param { num_output: 1 } convolution_param { pad: 1 } }',
                   caffe_pb2.NetParameter())
    # repeated fields may repeat
    assert list(parse_text('layer { bottom: "a" bottom: "b" }', caffe_pb2.NetParameter()).layer[0].bottom) == ["a", "b"]


def test_latin1_comment_is_accepted_as_caffe_does(tmp_path):
    text = (b'# r\xe9seau de test \xff\xfe\n' + INPUT.encode()
            + b'layer { name: "r" type: "ReLU" bottom: "x" top: "x" } # caf\xe9 "quoted # \xe9\n')
    path = tmp_path / "latin1.prototxt"
    path.write_bytes(text)
    param = read_net_text(path)
    assert [layer.name for layer in param.layer] == ["in", "r"]


def test_non_utf8_string_value_is_an_error_naming_line_and_column(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_bytes(b'name: "ok"\nlayer { name: "caf\xe9" type: "ReLU" }\n')
    with pytest.raises(ProtoFileError, match=r"bad\.prototxt:2:19: byte 0xe9 is not UTF-8"):
        read_net_text(path)


def test_hash_inside_a_string_does_not_start_a_comment():
    text = decode_text(b'name: "a#\\"b" # \xe9\nlayer { name: \'c#d\' }', "t")
    param = parse_text(text, caffe_pb2.NetParameter())
    assert param.name == 'a#"b' and param.layer[0].name == "c#d"


def test_nul_in_a_path_is_a_clear_error(tmp_path):
    solver = write(tmp_path, "s.prototxt", 'net: "\\000"\nbase_lr: 0.1\n')
    with pytest.raises(ProtoFileError, match="NUL byte"):
        create_solver(read_solver_text(solver), source=solver)
    with pytest.raises(ProtoFileError, match="NUL byte"):
        Net("a\0b.prototxt", caffe_pb2.TEST)


def test_invalid_utf8_path_is_read(tmp_path):
    name = os.fsdecode(b"r\xe9seau.prototxt")
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(IP_NET)
    assert Net(path, caffe_pb2.TEST).layer_names == ["in", "ip"]


def test_solver_file_name_that_is_not_utf8(tmp_path):
    net = write(tmp_path, "net.prototxt", LOSS_NET)
    path = os.path.join(str(tmp_path), os.fsdecode(b"s\xff.prototxt"))
    with open(path, "w") as f:
        f.write(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed"\n')
    with pytest.raises(SolverError, match="the solver file's name is not UTF-8.*set snapshot_prefix"):
        create_solver(read_solver_text(path), source=path)
    with open(path, "a") as f:
        f.write(f'snapshot_prefix: "{tmp_path / "snap"}"\n')
    create_solver(read_solver_text(path), source=path).step(1)


# ------------------------------------------------------------------ weights (items 4, 5)
def test_empty_caffemodel_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "w.caffemodel").write_bytes(b"")
    with pytest.raises(ProtoFileError, match=r"w\.caffemodel: empty file \(0 bytes\)"):
        net_from(tmp_path, IP_NET, weights=str(tmp_path / "w.caffemodel"))


def test_truncated_caffemodel_is_an_error_naming_the_file(tmp_path):
    net = net_from(tmp_path, IP_NET)
    net.save(str(tmp_path / "w.caffemodel"))
    data = (tmp_path / "w.caffemodel").read_bytes()
    for cut in (len(data) - 1, len(data) - 5, len(data) // 2, 3):
        (tmp_path / "t.caffemodel").write_bytes(data[:cut])
        with pytest.raises((ProtoFileError, WeightsError), match=r"t\.caffemodel"):
            net.copy_from(str(tmp_path / "t.caffemodel"))


def test_blob_value_count_mismatch_names_file_layer_and_param(tmp_path):
    param = caffe_pb2.NetParameter()
    layer = param.layer.add(name="ip")
    b = layer.blobs.add(data=[1.0, 2.0, 3.0])
    b.shape.dim.extend([2, 2])
    layer.blobs.add(data=[0.0, 0.0]).shape.dim.append(2)
    (tmp_path / "w.caffemodel").write_bytes(param.SerializeToString())
    net = net_from(tmp_path, IP_NET)
    with pytest.raises(WeightsError, match=r"w\.caffemodel: layer 'ip' param 0: the blob holds 3 data values "
                                           r"for its shape \(2, 2\) \(4 values\)"):
        net.copy_from(str(tmp_path / "w.caffemodel"))
    b.ClearField("data")  # a blob with a shape and no values: Caffe's CHECK_EQ(count_, data_size) fails too
    (tmp_path / "w.caffemodel").write_bytes(param.SerializeToString())
    with pytest.raises(WeightsError, match="holds 0 data values"):
        net.copy_from(str(tmp_path / "w.caffemodel"))


def test_caffemodel_matching_no_layer_warns(tmp_path):
    other = caffe_pb2.NetParameter()
    other.layer.add(name="fc_other").blobs.add(data=[1.0]).shape.dim.append(1)
    (tmp_path / "w.caffemodel").write_bytes(other.SerializeToString())
    net = net_from(tmp_path, IP_NET)
    with capture_log() as lines:
        net.copy_from(str(tmp_path / "w.caffemodel"))
    assert "Ignoring source layer fc_other" in lines
    assert any("None of the 1 layers in" in ln and "no weights were copied" in ln for ln in lines)


def test_fake_hdf5_weights_and_data_are_named(tmp_path):
    (tmp_path / "w.h5").write_text("this is text, not HDF5\n")
    with pytest.raises(WeightsError, match=r"w\.h5: named \.h5 but not an HDF5 file"):
        net_from(tmp_path, IP_NET, weights=str(tmp_path / "w.h5"))
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'w.h5'}\n")
    text = (f'layer {{ name: "h5" type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{tmp_path / "list.txt"}" '
            'batch_size: 1 } }')
    with pytest.raises(LayerError, match=r"'h5'.*w\.h5"):
        net_from(tmp_path, text, phase=caffe_pb2.TRAIN)


def _png_header(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_in_an_image_list_is_named(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(60000, 60000))
    (tmp_path / "list.txt").write_text("bomb.png 0\n")
    text = (f'layer {{ name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ '
            f'source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}/" batch_size: 1 }} }}')
    with pytest.raises(LayerError, match=r"'img'.*list\.txt:1: .*bomb\.png: refused to decode a possible "
                                         r"decompression bomb"):
        net_from(tmp_path, text, phase=caffe_pb2.TRAIN)


def test_decompression_bomb_in_caffe_io_load_image_is_named(tmp_path):
    import caffe
    (tmp_path / "bomb.png").write_bytes(_png_header(60000, 60000))
    with pytest.raises(ValueError, match=r"bomb\.png: cannot read as an image: .*decompression bomb"):
        caffe.io.load_image(str(tmp_path / "bomb.png"))


# ------------------------------------------------------------------ layers (item 4)
@pytest.mark.parametrize("layer, message", [
    (('layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 2 '
      'kernel_size: 2147483647 } }'), r"'c' failed to set up: .*blob size exceeds INT_MAX"),
    (('layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 0 '
      'kernel_size: 3 } }'), r"'c': num_output must be positive, got 0"),
    ('layer { name: "p" type: "Pooling" bottom: "x" top: "x" pooling_param { kernel_size: 2 } }',
     (r"Pooling layer 'p' cannot compute in place: its top 'x' would change shape from 1 2 5 5 \(50\) to "
      r"1 2 4 4 \(32\)")),
    (('layer { name: "c" type: "Convolution" bottom: "x" top: "x" convolution_param { num_output: 3 '
      'kernel_size: 1 } }'), r"'c' cannot compute in place"),
])
def test_bad_layer_settings_are_layer_errors_at_setup(tmp_path, layer, message):
    with pytest.raises(LayerError, match=message):
        net_from(tmp_path, INPUT + layer)


def test_zero_channels_are_refused_at_setup(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 0 dim: 5 dim: 5 } } }\n'
            'layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 2 '
            'kernel_size: 3 } }')
    with pytest.raises(LayerError, match=r"'c': the input 'x' has 0 channels"):
        net_from(tmp_path, text)


def test_inner_product_over_zero_inputs_runs(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 3 dim: 0 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 '
            'bias_filler { type: "constant" value: 1.5 } } }')
    net = net_from(tmp_path, text)
    assert np.array_equal(net.forward()["y"], np.full((3, 2), 1.5, np.float32))


def test_blob_size_is_capped_at_int_max_as_in_caffe():
    with pytest.raises(BlobError, match="exceeds INT_MAX"):
        Blob((65536, 32768))
    Blob((65536, 32767))  # INT_MAX - 65535 values: lazily allocated, fine
    # found by the fuzzer: pad 0x7fffffff on an empty batch gave a (0, 4, 4294967300, 4294967300) top
    # whose pooling masks took 21 GB; the non-zero axes are held to the same limit
    with pytest.raises(BlobError, match="non-zero axes hold more than INT_MAX"):
        Blob((0, 4, 50000, 50000))
    Blob((0, 3, 224, 224))


# ------------------------------------------------------------------ solvers (item 4)
def _lr(**settings):
    p = caffe_pb2.SolverParameter(base_lr=0.1, **settings)
    return learning_rate(p, settings.pop("it", 0) if "it" in settings else 0, 0)[0]


def test_sigmoid_policy_saturates_instead_of_overflowing():
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="sigmoid", gamma=-0.001, stepsize=100000)
    assert learning_rate(p, 810000, 0)[0] == 0.0  # exp(710) overflows a double: rate 0, as Caffe
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="sigmoid", gamma=1000, stepsize=10)
    assert learning_rate(p, 0, 0)[0] == 0.0
    assert learning_rate(p, 20, 0)[0] == pytest.approx(0.1)
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="sigmoid", gamma=0.01, stepsize=100)
    assert learning_rate(p, 150, 0)[0] == pytest.approx(0.1 / (1 + math.exp(-0.5)), rel=1e-6)


def test_policies_without_a_real_value_are_named():
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="poly", power=0.5, max_iter=100)
    with pytest.raises(LearningRateError, match=r"'poly' at iteration 150, past max_iter 100 \(power 0.5\)"):
        learning_rate(p, 150, 0)
    p.power = 2  # an integer power past max_iter has a value (C's pow): no error
    assert learning_rate(p, 150, 0)[0] == pytest.approx(0.1 * 0.25)
    p = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="exp", gamma=10)
    assert learning_rate(p, 1000, 0)[0] == math.inf  # overflow saturates, as pow does


def test_inv_with_negative_gamma_is_refused_at_solver_init(tmp_path):
    net = write(tmp_path, "net.prototxt", LOSS_NET)
    path = write(tmp_path, "s.prototxt", f'net: "{net}" base_lr: 0.1 lr_policy: "inv" gamma: -0.01 power: 0.75 '
                                         'max_iter: 1000')
    with pytest.raises(SolverError, match=r"s\.prototxt: lr_policy 'inv' with gamma -0.01 and power 0.75: "
                                          r"1 \+ gamma \* iter is negative from iteration 101"):
        create_solver(read_solver_text(path), source=path)
    for power in ("inf", "nan"):  # not a number a pow can take either
        path = write(tmp_path, "p.prototxt", f'net: "{net}" base_lr: 0.1 lr_policy: "inv" gamma: -0.1 '
                                             f'power: {power} max_iter: 100')
        with pytest.raises(SolverError, match=f"power {power}"):
            create_solver(read_solver_text(path), source=path)
    path = write(tmp_path, "ok.prototxt", f'net: "{net}" base_lr: 0.1 lr_policy: "inv" gamma: -0.01 power: 0.75 '
                                          'max_iter: 50')
    create_solver(read_solver_text(path), source=path)  # never reaches a negative base


@pytest.mark.parametrize("setting, value", [("momentum", "1"), ("momentum2", "1.5"), ("momentum", "-0.1")])
def test_adam_settings_are_checked_at_init(tmp_path, setting, value):
    net = write(tmp_path, "net.prototxt", LOSS_NET)
    path = write(tmp_path, "s.prototxt", f'net: "{net}" type: "Adam" base_lr: 0.1 lr_policy: "fixed" '
                                         f'{setting}: {value}')
    with pytest.raises(SolverError, match=rf"s\.prototxt: Adam needs 0 <= {setting} < 1, got {setting}: "):
        create_solver(read_solver_text(path), source=path)


def test_malformed_hdf5_solverstate_is_named(tmp_path):
    import h5py

    from recaffe.io.hdf5_weights import HDF5FormatError
    net = write(tmp_path, "net.prototxt", LOSS_NET)
    path = write(tmp_path, "s.prototxt", f'net: "{net}" base_lr: 0.1 lr_policy: "fixed"')
    solver = create_solver(read_solver_text(path), source=path)
    with h5py.File(tmp_path / "a.solverstate.h5", "w") as f:
        f["iter"] = np.zeros((0,))
    (tmp_path / "b.solverstate.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "c.solverstate.h5", "w") as f:
        f["iter"], f["current_step"], f["history"] = [1], [0], np.zeros(3)
    for name in ("a", "b", "c"):  # a clean error naming the file (what is wrong with it, where known)
        with pytest.raises((HDF5FormatError, SolverError), match=rf"{name}\.solverstate\.h5: "):
            solver.restore(str(tmp_path / f"{name}.solverstate.h5"))


# ------------------------------------------------------------------ the caffe command
def test_user_errors_are_one_line_and_exit_1(tmp_path, capsys):
    write(tmp_path, "net.prototxt", INPUT + 'layer {\n name: "a"\n name: "b"\n type: "ReLU" }\n')
    (tmp_path / "w.caffemodel").write_bytes(b"")
    assert main(["test", f"-model={tmp_path / 'net.prototxt'}", f"-weights={tmp_path / 'w.caffemodel'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = (f'caffe test: error: {tmp_path / "net.prototxt"}:4:8: Non-repeated field "name" is specified '
                'multiple times (in caffe.LayerParameter).')
    assert [ln for ln in err.splitlines() if "error:" in ln] == [expected]
    assert main(["device_query", "-gpu", "zero"]) == 1
    assert "-gpu: expected device ids" in capsys.readouterr().err
    # the tools too
    assert main(["upgrade_net_proto_binary", str(tmp_path / "w.caffemodel"), str(tmp_path / "o")]) != 0
    assert "Traceback" not in capsys.readouterr().err


def test_internal_errors_keep_their_traceback_and_user_errors_show_one_with_the_env(tmp_path, monkeypatch, capsys):
    import recaffe.cli.main as cli

    def bug(flags):
        raise KeyError("a bug in recaffe")
    monkeypatch.setitem(cli.COMMANDS, "test", bug)
    with pytest.raises(KeyError):
        main(["test"])
    monkeypatch.setenv("RECAFFE_TRACEBACK", "1")
    with pytest.raises(ProtoFileError):
        main(["time", f"-model={tmp_path / 'missing.prototxt'}"])


def test_cli_error_in_a_subprocess_is_one_line(tmp_path):
    solver = write(tmp_path, "s.prototxt", 'net: "\\000"\nbase_lr: 0.1\n')
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    env.pop("RECAFFE_TRACEBACK", None)
    out = subprocess.run([sys.executable, "-m", "recaffe.cli.main", "train", f"-solver={solver}"],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "caffe train: error: '\\x00': not a valid file name" in out.stderr


def test_every_user_error_class_is_a_recaffe_error():
    from recaffe.cli.flags import FlagError
    from recaffe.data.db import DBError
    from recaffe.device import DeviceError
    from recaffe.io.hdf5_weights import HDF5FormatError
    for cls in (LayerError, ProtoFileError, WeightsError, SolverError, LearningRateError, BlobError, FlagError,
                DBError, DeviceError, HDF5FormatError):
        assert issubclass(cls, RecaffeError), cls
    assert issubclass(LayerError, ValueError) and issubclass(DBError, RuntimeError)  # kept for callers


# ------------------------------------------------------------------ what the fuzzer found
@pytest.mark.parametrize("shape, layer", [
    ("dim: 0 dim: 3 dim: 4 dim: 4", 'type: "BatchNorm"'),
    ("dim: 0 dim: 3 dim: 4 dim: 4", 'type: "MVN" mvn_param { normalize_variance: true }'),
    ("dim: 2 dim: 0 dim: 4", 'type: "InnerProduct" inner_product_param { num_output: 2 }'),
])
def test_zero_sized_inputs_run(tmp_path, shape, layer):
    text = (f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {shape} }} }} }}\n'
            f'layer {{ name: "l" {layer} bottom: "x" top: "y" }}')
    net = net_from(tmp_path, text, phase=caffe_pb2.TRAIN)
    net.forward()
    net.backward()


def test_lstm_over_zero_features_runs(tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" top: "c" input_param { shape { dim: 2 dim: 1 dim: 0 } '
            'shape { dim: 2 dim: 1 } } }\n'
            'layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "c" top: "h" recurrent_param { num_output: 3 } }')
    net = net_from(tmp_path, text, phase=caffe_pb2.TRAIN)
    assert net.forward()["h"].shape == (2, 1, 3)
    net.backward()


def test_pooling_stride_far_past_the_input_and_huge_lrn_size_are_layer_errors(tmp_path):
    pool = 'layer { name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { kernel_size: 2 stride: 65536 } }'
    with pytest.raises(LayerError, match=r"Pooling layer 'p': kernel \[2, 2\], stride \[65536, 65536\].*over "
                                         "INT_MAX"):
        net_from(tmp_path, INPUT + pool)
    lrn = 'layer { name: "n" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 4294967295 } }'
    with pytest.raises(LayerError, match="LRN layer 'n': local_size 4294967295 is too large"):
        net_from(tmp_path, INPUT + lrn)

"""caffe export --format torch with hostile names: names are data, never code.

A crafted layer, blob or net name (newlines, triple quotes, backslashes, unicode line
separators) must neither run anything when the exported module is imported nor break it.
"""
import os

import numpy as np
import pytest
import torch

from recaffe.export import build_graph, load_torch_module, write_torch
from recaffe.export.torch_export import to_torch_source
from recaffe.io.protofiles import parse_text
from recaffe.net import Net
from recaffe.proto import caffe_pb2

FLAG = "RECAFFE_PWNED"


def _payload(tmp_path) -> str:
    # Python that creates a file when run, and puts a flag into the environment
    target = os.path.join(str(tmp_path), "pwned")
    return f"__import__('os').environ.__setitem__('{FLAG}', '1') or open({target!r}, 'w')"


def hostile_names(tmp_path) -> list[str]:
    p = _payload(tmp_path)
    return [
        f"a\nimport os; {p}",                       # newline out of a comment
        f'b"""\n{p}\n"""',                           # triple quotes out of the docstring
        f"c'''\n{p}\n'''",
        f"d\\\n{p}",                                  # backslash line continuation
        f"e\r{p}",                                    # a bare carriage return ends a line for Python
        f"f\u2028{p}",                                # unicode line separator
        f"g\u2029\x0c\x00{p}",                        # paragraph separator, form feed, NUL
        f"h\\u000a{p}\\",                             # escape sequences spelled out, trailing backslash
        f"forward\n{p}",                              # clashes with nn.Module.forward after sanitizing
        "torch", "F", "float", "self", "__class__",   # names the generated code needs
        "ｆｕｌｌｗｉｄｔｈ", "ﬁ",                        # NFKC-normalized by Python's identifiers
        '"',
    ]


def _net_text(names, net_name) -> str:
    q = lambda s: '"' + "".join(f"\\{ord(c):03o}" if ord(c) < 128 else c for c in s) + '"'
    text = f"name: {q(net_name)}\n"
    text += f'layer {{ name: {q(names[0])} type: "Input" top: {q(names[1])} ' \
            'input_param { shape { dim: 2 dim: 3 } } }\n'
    bottom = names[1]
    for i in range(2, len(names) - 1, 2):
        layer, top = names[i], names[i + 1]
        kind = "ReLU" if i % 4 == 0 else "InnerProduct"
        extra = ' inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } ' \
                'bias_filler { type: "gaussian" std: 0.5 } }' if kind == "InnerProduct" else ""
        text += f'layer {{ name: {q(layer)} type: "{kind}" bottom: {q(bottom)} top: {q(top)}{extra} }}\n'
        bottom = top
    return text


def test_hostile_names_do_not_run_when_the_module_is_imported(tmp_path):
    names = hostile_names(tmp_path)
    p = _payload(tmp_path)
    param = parse_text(_net_text(names, f'net"""\n{p}\n#'), caffe_pb2.NetParameter())
    assert param.layer[0].name == names[0]  # the names reach the net unchanged
    net = Net(param, caffe_pb2.TEST)
    source, _ = to_torch_source(build_graph(net))
    compile(source, "<export>", "exec")
    assert "\u2028" not in source and "\r" not in source and source.isascii()
    os.environ.pop(FLAG, None)
    py, _ = write_torch(build_graph(net), tmp_path / "out")
    module = load_torch_module(py)
    assert FLAG not in os.environ
    assert not os.path.exists(tmp_path / "pwned")
    # ... and the module still computes the net
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    net.blobs[net.inputs[0]].data[...] = x
    ref = net.forward()[net.outputs[0]]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert module.INPUTS == (names[1],) and module.OUTPUTS == (net.outputs[0],)


@pytest.mark.parametrize("i", range(14))
def test_each_hostile_name_alone_as_the_net_name_and_a_blob_name(tmp_path, i):
    name = hostile_names(tmp_path)[i]
    param = parse_text(_net_text(["in", name, "ip", "out"], name), caffe_pb2.NetParameter())
    source, _ = to_torch_source(build_graph(Net(param, caffe_pb2.TEST)))
    os.environ.pop(FLAG, None)
    namespace = {}
    exec(compile(source, "<export>", "exec"), namespace)  # noqa: S102 - running it is the test
    assert FLAG not in os.environ and not os.path.exists(tmp_path / "pwned")
    cls = namespace[namespace["__all__"][0]]
    assert cls.INPUTS == (name,)

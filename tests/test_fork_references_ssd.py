"""The SSD fork's reference outputs (../shared/reference/forks/ssd, produced by weiliu89/caffe
branch ssd) through caffe.Net, within the tolerances each case states. Same format and checks as
test_reference_cases.py; DetectionOutput/DetectionEvaluate tops have data-dependent shapes, which
are compared too."""
import json
import os

import numpy as np
import pytest

import caffe
from conftest import REFERENCE, require_reference

FORK = REFERENCE / "forks" / "ssd"
CASES = sorted(c for c in os.listdir(FORK) if (FORK / c).is_dir()) if FORK.is_dir() else ["(missing)"]


def assert_close(ours, ref, rtol, atol, what):
    ours = np.asarray(ours, "f8")
    ref = np.asarray(ref, "f8")
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != the fork's {ref.shape}"
    bad = np.abs(ours - ref) > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: max abs err {np.max(np.abs(ours - ref)):.3g} (rtol {rtol}, atol {atol})"


@pytest.mark.parametrize("case", CASES)
def test_ssd_fork_case(case):
    d = require_reference("forks", "ssd", case)
    meta = json.loads((d / "case.json").read_text())
    z = np.load(d / "case.npz")
    rtol, atol = meta["rtol"], meta["atol"]
    phase = caffe.TRAIN if meta["phase"] == "TRAIN" else caffe.TEST
    net = caffe.Net(str(d / "net.prototxt"), phase, weights=str(d / "weights.caffemodel"))
    entries = [(k, k.split("__")) for k in z.files]
    for k, (kind, *rest) in entries:
        if kind == "bottom":
            net.blobs[rest[0]].reshape(*z[k].shape)
            net.blobs[rest[0]].data[...] = z[k]
        elif kind == "param":
            assert_close(net.params[rest[0]][int(rest[1])].data, z[k], 0, 0, f"weights {k}")
    net.forward()
    for k, (kind, *rest) in entries:
        if kind == "top":
            assert_close(net.blobs[rest[0]].data, z[k], rtol, atol, k)
    if meta["forward_only"]:
        return
    for k, (kind, *rest) in entries:
        if kind == "top_diff":
            net.blobs[rest[0]].diff[...] = z[k]
    net.backward()
    for k, (kind, *rest) in entries:
        if kind == "bottom_diff":
            assert_close(net.blobs[rest[0]].diff, z[k], rtol, atol, k)
        elif kind == "param_diff":
            assert_close(net.params[rest[0]][int(rest[1])].diff, z[k], rtol, atol, k)

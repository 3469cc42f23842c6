"""The real Caffe's reference outputs (../shared/reference/layers and solvers), through caffe.Net
and caffe.get_solver, within the tolerances each case states."""
import json
import os

import numpy as np
import pytest

import caffe
from conftest import REFERENCE, require_reference

LAYER_CASES = sorted(os.listdir(REFERENCE / "layers")) if (REFERENCE / "layers").is_dir() else ["(missing)"]
SOLVER_CASES = sorted(os.listdir(REFERENCE / "solvers")) if (REFERENCE / "solvers").is_dir() else ["(missing)"]


# Looser tolerances for GPU runs (RECAFFE_TEST_DEVICE=cuda), only for cases where GPU algorithms
# (cuDNN's convolution algorithms, parallel reduction orders) differ from Caffe's CPU reference:
# case -> (rtol, atol, why). Empty until a GPU run shows a need; each entry says why.
GPU_TOLERANCES: dict[str, tuple[float, float, str]] = {}


def tolerances(case: str, meta: dict, device: str) -> tuple[float, float]:
    rtol, atol = meta["rtol"], meta["atol"]
    if device == "cuda" and case in GPU_TOLERANCES:
        rtol, atol = max(rtol, GPU_TOLERANCES[case][0]), max(atol, GPU_TOLERANCES[case][1])
    return rtol, atol


def assert_close(ours, ref, rtol, atol, what):
    ours = np.asarray(ours, "f8")
    ref = np.asarray(ref, "f8")
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != Caffe's {ref.shape}"
    bad = np.abs(ours - ref) > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: max abs err {np.max(np.abs(ours - ref)):.3g} (rtol {rtol}, atol {atol})"


def run_layer_case(d, who="Caffe", check=assert_close):
    """Drive one layer case as it was produced (see ../shared/reference/README.md): bottoms and
    params in, tops (and params after forward) out; then, unless forward-only, top diffs in and
    bottom/param diffs out. Tops of data-dependent shape (the forks' detection layers) are compared
    with their shapes. ``check(ours, ref, rtol, atol, what)`` compares (mixed precision's is
    looser). Returns the net."""
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
        elif kind == "param":  # the caffemodel must load exactly
            assert_close(net.params[rest[0]][int(rest[1])].data, z[k], 0, 0, f"weights {k}")
    net.forward()
    for k, (kind, *rest) in entries:
        if kind == "top":
            check(net.blobs[rest[0]].data, z[k], rtol, atol, k)
        elif kind == "param_after_forward":
            check(net.params[rest[0]][int(rest[1])].data, z[k], rtol, atol, k)
    if meta["forward_only"]:
        return net
    for k, (kind, *rest) in entries:
        if kind == "top_diff":
            net.blobs[rest[0]].diff[...] = z[k]
    net.backward()
    for k, (kind, *rest) in entries:
        if kind == "bottom_diff":
            check(net.blobs[rest[0]].diff, z[k], rtol, atol, k)
        elif kind == "param_diff":
            check(net.params[rest[0]][int(rest[1])].diff, z[k], rtol, atol, k)
    return net


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_case(case):
    run_layer_case(require_reference("layers", case))


def _fork_cases(fork):
    d = REFERENCE / "forks" / fork
    if not d.is_dir():
        return [(fork, "(missing)")]
    return [(fork, c) for c in sorted(os.listdir(d)) if (d / c).is_dir()]


# The real forks' outputs (../shared/reference/forks/<fork>/README.md): the same format.
FORK_CASES = _fork_cases("ssd") + _fork_cases("deeplab") + _fork_cases("segnet")


@pytest.mark.parametrize("fork, case", FORK_CASES, ids=[f"{f}/{c}" for f, c in FORK_CASES])
def test_fork_case(fork, case):
    run_layer_case(require_reference("forks", fork, case))


@pytest.mark.parametrize("case", SOLVER_CASES)
def test_solver_case(case, monkeypatch, test_device):
    d = require_reference("solvers", case)
    meta = json.loads((d / "case.json").read_text())
    meta["rtol"], meta["atol"] = tolerances(case, meta, test_device)
    z = np.load(d / "trajectory.npz")
    monkeypatch.chdir(d)
    solver = caffe.get_solver("solver.prototxt")
    net = solver.net
    net.copy_from("init.caffemodel")
    for s in range(1, meta["steps"] + 1):
        net.blobs["data"].data[...] = z["batches_data"][(s - 1) % 4]
        net.blobs["label"].data[...] = z["batches_label"][(s - 1) % 4]
        solver.step(1)
        assert_close(solver.lr, z["lrs"][s - 1], 1e-6, 0, f"lr after step {s}")
        for k in z.files:
            if k.startswith(f"step{s}__"):
                _, lname, i = k.split("__")
                assert_close(net.params[lname][int(i)].data, z[k], meta["rtol"], meta["atol"], k)

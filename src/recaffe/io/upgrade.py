"""Upgrades of old Caffe file formats, applied automatically when a file is read (as Caffe does).

Handled here: a net's legacy ``input:``/``input_shape:``/``input_dim:`` fields become an Input layer;
a solver's deprecated ``solver_type`` enum becomes the ``type`` string. Nets in the V0/V1 layer
format (``layers { type: CONVOLUTION }``) are reported clearly.
"""
from __future__ import annotations

from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)

_SOLVER_TYPE_NAMES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}


class UpgradeError(ValueError):
    pass


def upgrade_net(param: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Upgrade ``param`` in place to the current format and return it."""
    if len(param.layers):
        raise UpgradeError(f"{source}: this net uses the V1 layer format (`layers {{ ... }}`), which "
                           "recaffe cannot read yet; convert it with Caffe's upgrade_net_proto_text")
    if len(param.input):
        _upgrade_net_input(param, source)
    return param


def _upgrade_net_input(param: caffe_pb2.NetParameter, source: str) -> None:
    """Move legacy net inputs into an Input layer placed first (Caffe's UpgradeNetInput)."""
    log.info("Attempting to upgrade input file specified using deprecated input fields: %s", source)
    has_shape = len(param.input_shape) > 0
    has_dim = len(param.input_dim) > 0
    if has_shape and has_dim:
        raise UpgradeError(f"{source}: give either input_shape or input_dim, not both")
    if has_dim and len(param.input_dim) != 4 * len(param.input):
        raise UpgradeError(f"{source}: input_dim must give 4 values per input ({len(param.input)} inputs, "
                           f"{len(param.input_dim)} values)")
    if has_shape and len(param.input_shape) not in (1, len(param.input)):
        raise UpgradeError(f"{source}: input_shape must be given once per input")
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    for i, name in enumerate(param.input):
        layer.top.append(name)
        shape = layer.input_param.shape.add()
        if has_shape:
            shape.CopyFrom(param.input_shape[i if len(param.input_shape) > 1 else 0])
        elif has_dim:
            shape.dim.extend(param.input_dim[4 * i:4 * i + 4])
    layers = [layer] + list(param.layer)
    del param.layer[:]
    param.layer.extend(layers)
    param.ClearField("input")
    param.ClearField("input_shape")
    param.ClearField("input_dim")
    log.info("Successfully upgraded file specified using deprecated input fields.")


def upgrade_solver(param: caffe_pb2.SolverParameter, source: str = "<solver>") -> caffe_pb2.SolverParameter:
    """Replace the deprecated ``solver_type`` enum by the ``type`` string (Caffe's UpgradeSolverType)."""
    if param.HasField("solver_type"):
        name = _SOLVER_TYPE_NAMES[param.solver_type]
        if param.HasField("type") and param.type != name:
            raise UpgradeError(f"{source}: solver type given twice and differently: type {param.type!r} "
                               f"and solver_type {caffe_pb2.SolverParameter.SolverType.Name(param.solver_type)}")
        param.type = name
        param.ClearField("solver_type")
    return param

"""Upgrades of old Caffe file formats, applied automatically when a file is read (as Caffe does).

Caffe's UpgradeNetAsNeeded runs, in this order, on text nets and binary ``.caffemodel`` files alike:

1. **V0 -> V1**: ``layers { layer { type: "conv" ... } bottom: ... }`` (V0LayerParameter inside a
   V1LayerParameter). ``padding`` layers are folded into the conv/pool layer they feed, the V0 flat
   fields move into the per-type ``*_param`` messages, scale/meanfile/cropsize/mirror into
   ``transform_param``. Only the net's name, inputs, input_dim and force_backward survive (as in Caffe).
2. **Data transformation**: V1 Data/ImageData/WindowData layers with scale/mean_file/crop_size/mirror
   in their ``*_param`` have them moved into ``transform_param``.
3. **V1 -> V2**: ``layers { type: CONVOLUTION }`` become ``layer { type: "Convolution" }``;
   blobs_lr/weight_decay/param names/blob_share_mode become ``param { lr_mult decay_mult name
   share_mode }``; every ``*_param`` is copied.
4. **Input fields**: ``input:`` with ``input_shape``/``input_dim`` become an Input layer placed first;
   inputs without any shape (legacy ``.caffemodel`` files) are simply dropped.
5. **BatchNorm**: a BatchNorm layer declaring its 3 param specs gets lr_mult and decay_mult 0 on them
   (Caffe 1.0; names and share modes stay).

Caffe's fatal cases (unknown V0 layer type, a bottom no earlier layer produced, a padding layer
feeding anything but one conv/pool) raise UpgradeError naming the file and the layer. Caffe's
"problems" (a V0 field that does not apply to the layer's type, a net mixing ``layer`` and
``layers``) are logged as errors and the upgrade continues, as in Caffe; ``upgrade_net_as_needed``
returns False then (the upgrade tools exit with 1).

A solver's deprecated ``solver_type`` enum becomes the ``type`` string.
"""
from __future__ import annotations

from google.protobuf import descriptor as _descriptor

from ..errors import RecaffeError
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)

V1 = caffe_pb2.V1LayerParameter

_SOLVER_TYPE_NAMES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}

# V0 type strings -> V1 enum (Caffe's UpgradeV0LayerType).
_V0_TYPES = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS, "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT, "im2col": V1.IM2COL,
    "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS, "innerproduct": V1.INNER_PRODUCT,
    "lrn": V1.LRN, "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING,
    "relu": V1.RELU, "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX, "softmax_loss": V1.SOFTMAX_LOSS,
    "split": V1.SPLIT, "tanh": V1.TANH, "window_data": V1.WINDOW_DATA,
}

# V0 field -> {V0 type it applies to: destination "param_message.field"}. A V0 field set on a
# type not listed is one of Caffe's upgrade "problems": reported and dropped.
_CONV_IP = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_CONV_POOL = {"conv": "convolution_param", "pool": "pooling_param"}
_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
            "window_data": "window_data_param"}
_V0_FIELDS: dict[str, dict[str, str]] = {
    "num_output": {t: f"{p}.num_output" for t, p in _CONV_IP.items()},
    "biasterm": {t: f"{p}.bias_term" for t, p in _CONV_IP.items()},
    "weight_filler": {t: f"{p}.weight_filler" for t, p in _CONV_IP.items()},
    "bias_filler": {t: f"{p}.bias_filler" for t, p in _CONV_IP.items()},
    "pad": {t: f"{p}.pad" for t, p in _CONV_POOL.items()},
    "kernelsize": {t: f"{p}.kernel_size" for t, p in _CONV_POOL.items()},
    "group": {"conv": "convolution_param.group"},
    "stride": {t: f"{p}.stride" for t, p in _CONV_POOL.items()},
    "pool": {"pool": "pooling_param.pool"},  # MAX/AVE/STOCHASTIC have the same numbers in both enums
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {**{t: f"{p}.source" for t, p in _SOURCES.items()},
               "infogain_loss": "infogain_loss_param.source"},
    "scale": {None: "transform_param.scale"},  # None: whatever the type
    "meanfile": {None: "transform_param.mean_file"},
    "batchsize": {t: f"{p}.batch_size" for t, p in _SOURCES.items()},
    "cropsize": {None: "transform_param.crop_size"},
    "mirror": {None: "transform_param.mirror"},
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}

# V1 enum -> V2 type string (Caffe's UpgradeV1LayerType).
_V1_TYPES = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax", V1.BNLL: "BNLL",
    V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss", V1.CONVOLUTION: "Convolution",
    V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data", V1.DROPOUT: "Dropout",
    V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss", V1.ELTWISE: "Eltwise",
    V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data", V1.HDF5_OUTPUT: "HDF5Output",
    V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col", V1.IMAGE_DATA: "ImageData",
    V1.INFOGAIN_LOSS: "InfogainLoss", V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN",
    V1.MEMORY_DATA: "MemoryData", V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    V1.MVN: "MVN", V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split", V1.SLICE: "Slice",
    V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData", V1.THRESHOLD: "Threshold",
}

# Every *_param a V1 layer can hold exists under the same name in LayerParameter; all are copied.
_V1_PARAM_MESSAGES = tuple(f.name for f in V1.DESCRIPTOR.fields if f.name.endswith("_param"))

# V1 data layer type -> its *_param holding the deprecated transformation fields.
_DATA_LAYER_PARAMS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                      V1.WINDOW_DATA: "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


class UpgradeError(RecaffeError, ValueError):
    """An old-format net or solver that cannot be upgraded; the message names the file (and layer)."""


# ---------------------------------------------------------------------------------------- nets
def upgrade_net(param: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Upgrade ``param`` in place to the current format and return it."""
    upgrade_net_as_needed(param, source)
    return param


def net_needs_upgrade(param: caffe_pb2.NetParameter) -> bool:
    return (needs_v0_upgrade(param) or len(param.layers) > 0 or needs_data_upgrade(param)
            or len(param.input) > 0 or needs_batch_norm_upgrade(param))


def upgrade_net_as_needed(param: caffe_pb2.NetParameter, source: str = "<net>") -> bool:
    """Caffe's UpgradeNetAsNeeded; False when some part could not be carried over (logged)."""
    success = True
    if needs_v0_upgrade(param):
        log.info("Attempting to upgrade input file specified using deprecated V0LayerParameter: %s", source)
        if upgrade_v0_net(param, source):
            log.info("Successfully upgraded file specified using deprecated V0LayerParameter")
        else:
            success = False
            log.error("Warning: had one or more problems upgrading V0NetParameter to NetParameter "
                      "(see above); continuing anyway.")
        log.warning("V0 nets will not be read by future versions; convert files once with "
                    "upgrade_net_proto_text (prototxt) and upgrade_net_proto_binary (weights).")
    if needs_data_upgrade(param):
        log.info("Attempting to upgrade input file specified using deprecated transformation parameters: %s",
                 source)
        upgrade_data_transformation(param)
        log.info("Successfully upgraded file specified using deprecated data transformation parameters.")
        log.warning("Transformation fields belong in transform_param messages.")
    if len(param.layers):
        log.info("Attempting to upgrade input file specified using deprecated V1LayerParameter: %s", source)
        if upgrade_v1_net(param, source):
            log.info("Successfully upgraded file specified using deprecated V1LayerParameter")
        else:
            success = False
            log.error("Warning: had one or more problems upgrading V1LayerParameter (see above); "
                      "continuing anyway.")
    if len(param.input):
        log.info("Attempting to upgrade input file specified using deprecated input fields: %s", source)
        upgrade_net_input(param, source)
        log.info("Successfully upgraded file specified using deprecated input fields.")
        log.warning("Use Input layers rather than input fields: future versions will only read those.")
    if needs_batch_norm_upgrade(param):
        log.info("Attempting to upgrade batch norm layers using deprecated params: %s", source)
        upgrade_batch_norm(param)
        log.info("Successfully upgraded batch norm layers using deprecated params.")
    return success


# ----------------------------------------------------------------------------------- V0 -> V1
def needs_v0_upgrade(param: caffe_pb2.NetParameter) -> bool:
    return any(layer.HasField("layer") for layer in param.layers)


def upgrade_v0_net(param: caffe_pb2.NetParameter, source: str = "<net>") -> bool:
    """Caffe's UpgradeV0Net, in place: V0 layers (padding folded in) become V1 layers."""
    layers = _fold_v0_padding(param, source)
    name = param.name if param.HasField("name") else None
    inputs, dims = list(param.input), list(param.input_dim)
    force_backward = param.force_backward if param.HasField("force_backward") else None
    param.Clear()
    if name is not None:
        param.name = name
    ok = True
    for layer in layers:
        ok &= _upgrade_v0_layer(layer, param.layers.add(), source)
    param.input.extend(inputs)
    param.input_dim.extend(dims)
    if force_backward is not None:
        param.force_backward = force_backward
    return ok


def _v0_name(layer: caffe_pb2.V1LayerParameter, index: int) -> str:
    name = layer.layer.name or layer.name
    return repr(name) if name else f"#{index}"


def _fold_v0_padding(param: caffe_pb2.NetParameter, source: str) -> list[caffe_pb2.V1LayerParameter]:
    """Drop V0 ``padding`` layers, giving their pad to the conv/pool layer they feed (which then reads
    the padding layer's input), as Caffe's UpgradeV0PaddingLayers."""
    producer = {name: None for name in param.input}  # blob -> index of the last layer writing it
    out: list[caffe_pb2.V1LayerParameter] = []
    for i, conn in enumerate(param.layers):
        v0 = conn.layer
        kept = None
        if v0.type != "padding":
            kept = caffe_pb2.V1LayerParameter()
            kept.CopyFrom(conn)
            out.append(kept)
        for j, blob in enumerate(conn.bottom):
            if blob not in producer:
                raise UpgradeError(f"{source}: V0 layer {_v0_name(conn, i)}: unknown bottom blob {blob!r} "
                                   "(no input or earlier layer produces it)")
            src_index = producer[blob]
            if src_index is None:
                continue
            src = param.layers[src_index]
            if src.layer.type != "padding":
                continue
            where = f"{source}: V0 layer {_v0_name(conn, i)}"
            if v0.type not in ("conv", "pool"):
                raise UpgradeError(f"{where}: a padding layer ({_v0_name(src, src_index)}) feeds a layer of "
                                   f"type {v0.type!r}; only conv and pool layers can take padding")
            if len(conn.bottom) != 1:
                raise UpgradeError(f"{where}: a layer fed by a padding layer must have exactly one bottom")
            if len(src.bottom) != 1 or len(src.top) != 1:
                raise UpgradeError(f"{source}: V0 padding layer {_v0_name(src, src_index)} must have exactly "
                                   "one bottom and one top")
            kept.layer.pad = src.layer.pad
            kept.bottom[j] = src.bottom[0]
        for blob in conn.top:
            producer[blob] = i
    return out


def _upgrade_v0_layer(conn: caffe_pb2.V1LayerParameter, out: caffe_pb2.V1LayerParameter,
                      source: str) -> bool:
    """Caffe's UpgradeV0LayerParameter: only bottoms, tops and the V0 ``layer`` are carried over."""
    out.Clear()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return True
    v0 = conn.layer
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if v0.type not in _V0_TYPES:
            raise UpgradeError(f"{source}: V0 layer {v0.name!r}: unknown layer type {v0.type!r} "
                               f"(known: {', '.join(sorted(_V0_TYPES))})")
        out.type = _V0_TYPES[v0.type]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    ok = True
    for field, targets in _V0_FIELDS.items():
        if not v0.HasField(field):
            continue
        dest = targets.get(None) or targets.get(v0.type)
        if dest is None:
            log.error("%s: V0 layer %r: Unknown parameter %s for layer type %s", source, v0.name, field,
                      v0.type)
            ok = False
            continue
        _assign(out, dest, getattr(v0, field))
    return ok


def _assign(msg, dotted: str, value) -> None:
    """Set ``msg.<dotted>`` to ``value``: appended for repeated fields, copied for messages."""
    *path, name = dotted.split(".")
    for part in path:
        msg = getattr(msg, part)
    field = msg.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        getattr(msg, name).append(value)
    elif field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, name).CopyFrom(value)
    else:
        setattr(msg, name, value)


# ----------------------------------------------------------------------- data transformation
def needs_data_upgrade(param: caffe_pb2.NetParameter) -> bool:
    for layer in param.layers:
        field = _DATA_LAYER_PARAMS.get(layer.type)
        if field and any(getattr(layer, field).HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def upgrade_data_transformation(param: caffe_pb2.NetParameter) -> None:
    """Move scale/mean_file/crop_size/mirror of V1 data layers into transform_param (Caffe's
    UpgradeNetDataTransformation)."""
    for layer in param.layers:
        field = _DATA_LAYER_PARAMS.get(layer.type)
        if field is None:
            continue
        data_param = getattr(layer, field)
        for name in _TRANSFORM_FIELDS:
            if data_param.HasField(name):
                setattr(layer.transform_param, name, getattr(data_param, name))
                data_param.ClearField(name)


# ----------------------------------------------------------------------------------- V1 -> V2
def upgrade_v1_net(param: caffe_pb2.NetParameter, source: str = "<net>") -> bool:
    """Caffe's UpgradeV1Net, in place: every ``layers`` entry becomes a ``layer``. Like Caffe, a net
    that also has ``layer`` entries loses them (reported)."""
    ok = True
    if len(param.layer):
        log.error("%s: Input NetParameter to be upgraded already specifies 'layer' fields; these will be "
                  "ignored for the upgrade.", source)
        ok = False
    old = list(param.layers)
    param.ClearField("layer")
    new = [caffe_pb2.LayerParameter() for _ in old]
    for i, (v1, layer) in enumerate(zip(old, new)):
        if not upgrade_v1_layer(v1, layer, source):
            log.error("%s: Upgrade of input layer %d (%r) failed.", source, i, v1.name)
            ok = False
    param.ClearField("layers")
    param.layer.extend(new)
    return ok


def upgrade_v1_layer(v1: caffe_pb2.V1LayerParameter, layer: caffe_pb2.LayerParameter,
                     source: str = "<net>") -> bool:
    """Caffe's UpgradeV1LayerParameter."""
    layer.Clear()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        layer.type = _V1_TYPES[v1.type]
    layer.blobs.extend(v1.blobs)

    def spec(i: int) -> caffe_pb2.ParamSpec:
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = mode  # STRICT/PERMISSIVE have the same numbers in both enums
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for name in _V1_PARAM_MESSAGES:
        if v1.HasField(name):
            getattr(layer, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        log.error("%s: layer %r: Input NetParameter has V0 layer -- ignoring.", source, v1.name)
        return False
    return True


# -------------------------------------------------------------------------- input, BatchNorm
def upgrade_net_input(param: caffe_pb2.NetParameter, source: str = "<net>") -> None:
    """Move legacy net inputs into an Input layer placed first (Caffe's UpgradeNetInput). Inputs
    without shapes (old ``.caffemodel`` files) are just dropped, as Caffe does."""
    has_shape = len(param.input_shape) > 0
    has_dim = len(param.input_dim) > 0
    if has_shape and has_dim:
        raise UpgradeError(f"{source}: give either input_shape or input_dim, not both")
    if has_dim and len(param.input_dim) != 4 * len(param.input):
        raise UpgradeError(f"{source}: input_dim must give 4 values per input ({len(param.input)} inputs, "
                           f"{len(param.input_dim)} values)")
    if has_shape and len(param.input_shape) != len(param.input):
        # Caffe reads input_shape(i) for every input i (older Caffe checked: exactly one per input)
        raise UpgradeError(f"{source}: input_shape must be given exactly once per input ({len(param.input)} "
                           f"inputs, {len(param.input_shape)} input_shape)")
    if has_shape or has_dim:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(param.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(param.input_shape[i])
            else:
                shape.dim.extend(param.input_dim[4 * i:4 * i + 4])
        layers = [layer] + list(param.layer)
        del param.layer[:]
        param.layer.extend(layers)
    param.ClearField("input")
    param.ClearField("input_shape")
    param.ClearField("input_dim")


def needs_batch_norm_upgrade(param: caffe_pb2.NetParameter) -> bool:
    return any(layer.type == "BatchNorm" and len(layer.param) == 3 for layer in param.layer)


def upgrade_batch_norm(param: caffe_pb2.NetParameter) -> None:
    """Old BatchNorm definitions declared 3 param specs; Caffe 1.0 zeroes their lr_mult and decay_mult
    (the statistics are not learned) and keeps the rest (names for sharing)."""
    for layer in param.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


# ------------------------------------------------------------------------------------- solvers
def solver_needs_upgrade(param: caffe_pb2.SolverParameter) -> bool:
    return param.HasField("solver_type")


def upgrade_solver(param: caffe_pb2.SolverParameter, source: str = "<solver>") -> caffe_pb2.SolverParameter:
    """Replace the deprecated ``solver_type`` enum by the ``type`` string (Caffe's UpgradeSolverType).
    Like Caffe, giving both is an error."""
    if param.HasField("solver_type"):
        log.info("Attempting to upgrade input file specified using deprecated 'solver_type' field "
                 "(enum)': %s", source)
        if param.HasField("type"):
            enum_name = caffe_pb2.SolverParameter.SolverType.Name(param.solver_type)
            raise UpgradeError(
                f"{source}: Failed to upgrade solver: old solver_type field (enum, here {enum_name}) and new "
                f"type field (string, here {param.type!r}) cannot be both specified in solver proto text.")
        param.type = _SOLVER_TYPE_NAMES[param.solver_type]
        param.ClearField("solver_type")
        log.info("Successfully upgraded file specified using deprecated 'solver_type' field (enum) to "
                 "'type' field (string).")
    return param

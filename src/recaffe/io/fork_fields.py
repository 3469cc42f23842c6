"""The fields that Caffe's forks added to caffe.proto, and how their binary files are read.

Text files name their fields, so one schema (proto/caffe.proto) parses every fork's prototxt. Binary
files carry field *numbers*, and the forks reused numbers that BVLC Caffe (or another fork) gives to
something else: DeepLab's ``interp_param`` is 143, BVLC's ``input_param``; SegNet's ``upsample_param``
is 137, BVLC's ``embed_param``; NVCaffe's per-layer ``forward_type`` is 145, BVLC's
``parameter_param``. A ``.caffemodel`` is parsed with our schema first: weights need only a layer's
name, type and blobs, whose numbers every fork shares, so the weights are always right. Then
:func:`remap_fork_fields` re-reads what landed in the wrong field, told by the layer's type (an
``Interp`` layer has no ``input_param``), and what protobuf kept as unknown fields (PSPNet's
``bn_param`` 152, NVCaffe's 145-148 varints).

``FORK_FIELDS`` lists every field of ours that is not BVLC's, with the fork that defined it and
that fork's own number; ``UNSUPPORTED_FORK_FIELDS`` names fork fields we do not parse, so that an
error can say which fork a file comes from.
"""
from __future__ import annotations

import struct

from ..proto import caffe_pb2

SSD = "SSD (weiliu89/caffe, branch ssd)"
FRCNN = "Faster R-CNN (rbgirshick/caffe-fast-rcnn)"
RFCN = "R-FCN (daijifeng001/caffe-rfcn)"
OPENCV = "OpenCV's Caffe importer (opencv/opencv, modules/dnn)"
SEGNET = "SegNet (alexgkendall/caffe-segnet)"
PSPNET = "PSPNet (hszhao/PSPNet)"
DEEPLAB = "DeepLab v2 (deeplab-public-ver2)"
NVCAFFE = "NVCaffe (NVIDIA/caffe)"
SHUFFLENET = "ShuffleNet (farmingyard/ShuffleNet)"
YOLO = "YOLOv2 Caffe ports (darknet's reorg/region)"

# (message, field) -> (fork, the fork's own field number; None where it is ours by design)
FORK_FIELDS: dict[tuple[str, str], tuple[str, int | None]] = {
    ("BlobProto", "raw_data_type"): (NVCAFFE, 10),
    ("BlobProto", "raw_diff_type"): (NVCAFFE, 11),
    ("BlobProto", "raw_data"): (NVCAFFE, 12),
    ("BlobProto", "raw_diff"): (NVCAFFE, 13),
    ("NetParameter", "default_forward_type"): (NVCAFFE, 11),
    ("NetParameter", "default_backward_type"): (NVCAFFE, 12),
    ("NetParameter", "default_forward_math"): (NVCAFFE, 13),
    ("NetParameter", "default_backward_math"): (NVCAFFE, 14),
    ("NetParameter", "global_grad_scale"): (NVCAFFE, 15),
    ("NetParameter", "global_grad_scale_adaptive"): (NVCAFFE, 16),
    ("NetParameter", "default_conv_algos_override"): (NVCAFFE, 17),
    ("NetParameter", "reduce_buckets"): (NVCAFFE, 18),
    ("NetParameter", "default_cudnn_math_override"): (NVCAFFE, 19),
    ("SolverParameter", "min_lr"): (NVCAFFE, 43),
    ("SolverParameter", "solver_data_type"): (NVCAFFE, 44),
    ("SolverParameter", "store_blobs_in_old_format"): (NVCAFFE, 45),
    ("SolverParameter", "momentum_policy"): (NVCAFFE, 46),
    ("SolverParameter", "max_momentum"): (NVCAFFE, 47),
    ("SolverParameter", "momentum_power"): (NVCAFFE, 48),
    ("SolverParameter", "larc"): (NVCAFFE, 49),
    ("SolverParameter", "larc_policy"): (NVCAFFE, 50),
    ("SolverParameter", "larc_eta"): (NVCAFFE, 51),
    ("SolverParameter", "weight_decay_policy"): (NVCAFFE, 52),
    ("SolverParameter", "weight_decay_power"): (NVCAFFE, 53),
    ("SolverParameter", "test_and_snapshot_last_epochs"): (NVCAFFE, 54),
    ("SolverParameter", "larc_turbo"): (NVCAFFE, 55),
    ("SolverParameter", "max_weight_decay"): (NVCAFFE, 56),
    ("SolverParameter", "rampup_interval"): (NVCAFFE, 41),
    ("SolverParameter", "rampup_lr"): (NVCAFFE, 42),
    ("SolverParameter", "eval_type"): (SSD, 241),
    ("SolverParameter", "ap_version"): (SSD, 242),
    ("SolverParameter", "plateau_winsize"): (SSD, 243),
    ("SolverParameter", "show_per_class_result"): (SSD, 244),
    ("TransformationParameter", "resize_param"): (SSD, 8),
    ("TransformationParameter", "noise_param"): (SSD, 9),
    ("TransformationParameter", "emit_constraint"): (SSD, 10),
    ("TransformationParameter", "distort_param"): (SSD, 13),
    ("TransformationParameter", "expand_param"): (SSD, 14),
    ("TransformationParameter", "img_rand_resize_lower"): (NVCAFFE, 10),
    ("TransformationParameter", "img_rand_resize_upper"): (NVCAFFE, 11),
    ("TransformationParameter", "rand_resize_ratio_lower"): (NVCAFFE, 12),
    ("TransformationParameter", "rand_resize_ratio_upper"): (NVCAFFE, 13),
    ("TransformationParameter", "vertical_stretch_lower"): (NVCAFFE, 14),
    ("TransformationParameter", "vertical_stretch_upper"): (NVCAFFE, 15),
    ("TransformationParameter", "horizontal_stretch_lower"): (NVCAFFE, 16),
    ("TransformationParameter", "horizontal_stretch_upper"): (NVCAFFE, 17),
    ("TransformationParameter", "interpolation_algo_down"): (NVCAFFE, 18),
    ("TransformationParameter", "interpolation_algo_up"): (NVCAFFE, 19),
    ("TransformationParameter", "allow_upscale"): (NVCAFFE, 20),
    ("ImageDataParameter", "ignore_label"): (DEEPLAB, 15),
    ("ImageDataParameter", "label_type"): (DEEPLAB, 16),
    ("DropoutParameter", "scale_train"): (FRCNN, 2),
    ("LayerParameter", "annotated_data_param"): (SSD, 200),
    ("LayerParameter", "multibox_loss_param"): (SSD, 201),
    ("LayerParameter", "permute_param"): (SSD, 202),
    ("LayerParameter", "prior_box_param"): (SSD, 203),
    ("LayerParameter", "detection_output_param"): (SSD, 204),
    ("LayerParameter", "detection_evaluate_param"): (SSD, 205),
    ("LayerParameter", "norm_param"): (SSD, 206),
    ("LayerParameter", "video_data_param"): (SSD, 207),
    ("LayerParameter", "roi_pooling_param"): (FRCNN, 8266711),
    ("LayerParameter", "smooth_l1_loss_param"): (FRCNN, 8266712),
    ("LayerParameter", "psroi_pooling_param"): (RFCN, 10001),
    ("LayerParameter", "proposal_param"): (OPENCV, None),
    ("LayerParameter", "bn_param"): (SEGNET, 45),
    ("LayerParameter", "upsample_param"): (SEGNET, 137),
    ("LayerParameter", "dense_image_data_param"): (SEGNET, 138),
    ("LayerParameter", "interp_param"): (DEEPLAB, 143),
    ("LayerParameter", "seg_accuracy_param"): (DEEPLAB, 144),
    ("LayerParameter", "mat_write_param"): (DEEPLAB, 145),
    ("LayerParameter", "mat_read_param"): (DEEPLAB, 151),
    ("LayerParameter", "shuffle_channel_param"): (SHUFFLENET, 164),
    ("LayerParameter", "reorg_param"): (YOLO, None),
    ("LayerParameter", "region_param"): (YOLO, None),
    ("LayerParameter", "forward_type"): (NVCAFFE, 145),
    ("LayerParameter", "backward_type"): (NVCAFFE, 146),
    ("LayerParameter", "forward_math"): (NVCAFFE, 147),
    ("LayerParameter", "backward_math"): (NVCAFFE, 148),
    ("LayerParameter", "debug"): (NVCAFFE, 149),
    ("LayerParameter", "cudnn_math_override"): (NVCAFFE, 150),
    ("NetParameter", "eltwise_mem_sharing"): (NVCAFFE, 20),
    ("BatchNormParameter", "scale_filler"): (NVCAFFE, 5),
    ("BatchNormParameter", "bias_filler"): (NVCAFFE, 6),
    ("BatchNormParameter", "scale_bias"): (NVCAFFE, 7),
    ("BatchNormParameter", "engine"): (NVCAFFE, 15),
    ("DataParameter", "threads"): (NVCAFFE, 11),
    ("DataParameter", "parser_threads"): (NVCAFFE, 12),
    ("DataParameter", "cache"): (NVCAFFE, 13),
    ("DataParameter", "shuffle"): (NVCAFFE, 14),
    ("DataParameter", "precache"): (NVCAFFE, 16),
    ("ConvolutionParameter", "cudnn_convolution_algo_seeker"): (NVCAFFE, 19),
    ("ConvolutionParameter", "conv_algos_override"): (NVCAFFE, 20),
}

# Messages that exist only because a fork defined them (every field of theirs is a fork field).
FORK_MESSAGES: dict[str, str] = {name: SSD for name in (
    "LabelMapItem", "LabelMap", "Sampler", "SampleConstraint", "BatchSampler", "EmitConstraint",
    "NormalizedBBox", "Annotation", "AnnotationGroup", "AnnotatedDatum", "ResizeParameter",
    "SaltPepperParameter", "NoiseParameter", "DistortionParameter", "ExpansionParameter",
    "AnnotatedDataParameter", "DetectionEvaluateParameter", "NonMaximumSuppressionParameter",
    "SaveOutputParameter", "DetectionOutputParameter", "MultiBoxLossParameter", "NormalizeParameter",
    "PermuteParameter", "PriorBoxParameter", "VideoDataParameter")}
FORK_MESSAGES.update({
    "UpsampleParameter": SEGNET, "DenseImageDataParameter": SEGNET, "BNParameter": SEGNET + " and " + PSPNET,
    "InterpParameter": DEEPLAB, "MatWriteParameter": DEEPLAB, "MatReadParameter": DEEPLAB,
    "SegAccuracyParameter": DEEPLAB, "ROIPoolingParameter": FRCNN, "SmoothL1LossParameter": FRCNN,
    "PSROIPoolingParameter": RFCN, "ProposalParameter": OPENCV, "ShuffleChannelParameter": SHUFFLENET,
    "ReorgParameter": YOLO, "RegionParameter": YOLO,
})

# Fork fields recaffe does not parse: named in parse errors so the user learns where a file is from.
UNSUPPORTED_FORK_FIELDS: dict[str, str] = {
    "dense_crf_param": DEEPLAB, "domain_transform_param": DEEPLAB, "adaptive_bias_channel_param": DEEPLAB,
    "bias_channel_param": DEEPLAB, "unique_label_param": DEEPLAB, "trt_param": NVCAFFE,
    "box_annotator_ohem_param": "R-FCN / Deformable ConvNets (OHEM)", "yolo_v3_param": "YOLOv3 Caffe ports",
    "yolo_detection_output_param": "MobileNet-YOLO (eric612/MobileNet-YOLO)",
    # DeepLab v2's transform_param additions (8-10 there: SSD's resize_param/noise_param/emit_constraint)
    "scale_factors": DEEPLAB, "crop_height": DEEPLAB, "crop_width": DEEPLAB,
    # NVCaffe's other data-layer fields (its own crop, packing, GPU transform), loss, pooling and
    # DetectNet fields: they change what is computed, and recaffe does not implement them (its
    # random resize and stretch are implemented: data/transformer.py)
    **{name: NVCAFFE for name in (
        "forward_packing", "use_gpu_transform", "crop_h", "crop_w", "short_side", "dataset_share_per_node",
        "label_smoothing", "torch_pooling", "ignore_difficult_gt", "detectnet_groundtruth_param",
        "detectnet_augmentation_param")},
}

# Binary re-reading: layer type -> (BVLC field a fork number landed in, our field for that number).
_COLLISIONS: dict[str, tuple[str, str]] = {
    "Interp": ("input_param", "interp_param"),
    "SegAccuracy": ("crop_param", "seg_accuracy_param"),
    "MatWrite": ("parameter_param", "mat_write_param"),
    "Upsample": ("embed_param", "upsample_param"),
    "DenseImageData": ("tile_param", "dense_image_data_param"),
}
_PSPNET_BN_NUMBER = 152
_PSPNET_BN_RENUMBER = {1: 11, 2: 12, 3: 13, 4: 14, 5: 15, 6: 16}
_NVCAFFE_LAYER_TYPES = {145: "forward_type", 146: "backward_type", 147: "forward_math", 148: "backward_math"}


def fork_of_field(name: str) -> str | None:
    """The fork that defines a LayerParameter field called ``name``, where known."""
    if name in UNSUPPORTED_FORK_FIELDS:
        return UNSUPPORTED_FORK_FIELDS[name]
    for (msg, field), (fork, _) in FORK_FIELDS.items():
        if field == name:
            return fork
    return None


def remap_fork_fields(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Move fork params that a binary parse put under BVLC's numbers to their own fields (in place)."""
    for layer in net.layer:
        moved = _COLLISIONS.get(layer.type)
        if moved and layer.HasField(moved[0]):
            raw = getattr(layer, moved[0]).SerializeToString()
            layer.ClearField(moved[0])
            getattr(layer, moved[1]).MergeFromString(raw)
        _remap_unknown(layer)
    return net


def _remap_unknown(layer: caffe_pb2.LayerParameter) -> None:
    """PSPNet's bn_param (152) and NVCaffe's per-layer types (145-148 as varints) arrive as unknown fields."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    unknown = UnknownFieldSet(layer)
    if not len(unknown):
        return
    for field in unknown:
        if field.field_number == _PSPNET_BN_NUMBER and field.wire_type == 2 and layer.type == "BN":
            bn = caffe_pb2.BNParameter()
            for sub in UnknownFieldSet(_as_empty_message(field.data)):
                _merge_renumbered(bn, sub, _PSPNET_BN_RENUMBER)
            layer.bn_param.MergeFrom(bn)
        elif field.field_number in _NVCAFFE_LAYER_TYPES and field.wire_type == 0:
            setattr(layer, _NVCAFFE_LAYER_TYPES[field.field_number], field.data)


def _as_empty_message(data: bytes):
    """A message with no known fields holding ``data``, to walk its fields as unknown ones."""
    from google.protobuf import empty_pb2

    m = empty_pb2.Empty()
    m.MergeFromString(data)
    return m


def _merge_renumbered(target, field, renumber: dict[int, int]) -> None:
    number = renumber.get(field.field_number)
    if number is None:
        return
    desc = target.DESCRIPTOR.fields_by_number[number]
    if field.wire_type == 2:  # a sub-message (fillers)
        getattr(target, desc.name).MergeFromString(field.data)
    elif field.wire_type == 5:  # fixed32: a float
        setattr(target, desc.name, struct.unpack("<f", struct.pack("<I", field.data))[0])
    elif field.wire_type == 0:  # varint: bool or enum
        setattr(target, desc.name, bool(field.data) if desc.type == desc.TYPE_BOOL else field.data)


# ------------------------------------------------------------------ weights-only reading
_WEIGHTS_ONLY = None


def weights_only_net_class():
    """A NetParameter that knows only what weights need: layer names, types, bottoms/tops and blobs
    (V2 ``layer`` 100 and V1 ``layers`` 2). Every other field stays unparsed, so a fork's param under
    a number BVLC uses for another message cannot make the file unreadable."""
    global _WEIGHTS_ONLY
    if _WEIGHTS_ONLY is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        f = descriptor_pb2.FileDescriptorProto(name="recaffe_weights_only.proto", package="recaffe_weights",
                                               dependency=["caffe.proto"], syntax="proto2")
        T = descriptor_pb2.FieldDescriptorProto
        opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED

        def message(name, fields):
            m = f.message_type.add(name=name)
            for fname, number, label, ftype, type_name in fields:
                m.field.add(name=fname, number=number, label=label, type=ftype, type_name=type_name)

        blob = ".caffe.BlobProto"
        message("Layer", [("name", 1, opt, T.TYPE_STRING, None), ("type", 2, opt, T.TYPE_STRING, None),
                          ("bottom", 3, rep, T.TYPE_STRING, None), ("top", 4, rep, T.TYPE_STRING, None),
                          ("blobs", 7, rep, T.TYPE_MESSAGE, blob)])
        message("V1Layer", [("bottom", 2, rep, T.TYPE_STRING, None), ("top", 3, rep, T.TYPE_STRING, None),
                            ("name", 4, opt, T.TYPE_STRING, None), ("type", 5, opt, T.TYPE_INT32, None),
                            ("blobs", 6, rep, T.TYPE_MESSAGE, blob)])
        message("Net", [("name", 1, opt, T.TYPE_STRING, None),
                        ("layer", 100, rep, T.TYPE_MESSAGE, ".recaffe_weights.Layer"),
                        ("layers", 2, rep, T.TYPE_MESSAGE, ".recaffe_weights.V1Layer")])
        pool = descriptor_pool.Default()
        try:
            pool.FindFileByName(f.name)
        except KeyError:
            pool.Add(f)
        _WEIGHTS_ONLY = message_factory.GetMessageClass(pool.FindMessageTypeByName("recaffe_weights.Net"))
    return _WEIGHTS_ONLY


def weights_only_to_net(w) -> caffe_pb2.NetParameter:
    """The NetParameter holding just the names, types, bottoms/tops and blobs of a weights-only parse."""
    net = caffe_pb2.NetParameter(name=w.name)
    for src in w.layer:
        dst = net.layer.add(name=src.name, type=src.type, bottom=src.bottom, top=src.top)
        dst.blobs.extend(src.blobs)
    for src in w.layers:
        dst = net.layers.add(name=src.name, bottom=src.bottom, top=src.top)
        if src.type in caffe_pb2.V1LayerParameter.LayerType.values():
            dst.type = src.type
        dst.blobs.extend(src.blobs)
    return net


# ------------------------------------------------------------------ parsed, not (yet) acted on
# NVCaffe's mixed-precision fields that recaffe acts on (recaffe/precision.py): the types, the loss
# scale, and the math types (float32 accumulation inside the low-precision kernels).
_USED_NVCAFFE = {"default_forward_type", "default_backward_type", "default_forward_math",
                 "default_backward_math", "global_grad_scale", "global_grad_scale_adaptive"}
# NVCaffe's per-layer settings that only tune its own machinery (readers, cuDNN): read, not used.
_NVCAFFE_LAYER_KNOBS = {"LayerParameter": None, "DataParameter": "data_param",
                        "ConvolutionParameter": "convolution_param"}


def unimplemented_fields(msg) -> list[str]:
    """The fork fields set in ``msg`` (a NetParameter with its layers, or a SolverParameter) that
    recaffe parses but does not act on: NVCaffe's cuDNN/bucket settings, a backward type other than
    the forward type, float16 master weights, and NVCaffe's solver policies (recaffe keeps float32
    master weights and Caffe's solver rules); callers log these so nothing is ignored silently."""
    found = []
    name = type(msg).__name__
    for (message, field), (fork, _) in FORK_FIELDS.items():
        if fork != NVCAFFE or message != name or field in _USED_NVCAFFE:
            continue
        if field == "solver_data_type" and msg.solver_data_type == caffe_pb2.FLOAT:
            continue  # float32 master weights: what recaffe keeps
        if msg.HasField(field):
            found.append(field)
    if name == "NetParameter":
        knobs = [(m, f) for (m, f), (fork, _) in FORK_FIELDS.items() if fork == NVCAFFE and m in _NVCAFFE_LAYER_KNOBS
                 and f not in ("forward_type", "backward_type", "forward_math", "backward_math", "cache", "shuffle")]
        for layer in msg.layer:
            for m, f in knobs:
                holder = layer if _NVCAFFE_LAYER_KNOBS[m] is None else getattr(layer, _NVCAFFE_LAYER_KNOBS[m])
                if holder.HasField(f) and f"layer {f}" not in found:
                    found.append(f"layer {f}")
            # (each layer's backward runs in its forward type)
            forward = layer.forward_type if layer.HasField("forward_type") else msg.default_forward_type
            if layer.HasField("backward_type") and layer.backward_type != forward \
                    and "layer backward_type" not in found:
                found.append("layer backward_type")
    return found

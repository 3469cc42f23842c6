"""Write the small SSD of the shapes example with NetSpec, as the SSD fork's ssd_pascal.py writes
SSD300: examples/ssd/ssd_shapes_train_test.prototxt and examples/ssd/ssd_shapes_deploy.prototxt.

    python examples/ssd/make_nets.py

A 96x96 input, five 3x3 convolution/pooling stages, and SSD heads (location, confidence, PriorBox)
on the 24x24, 12x12 and 6x6 feature maps; 4 classes (background + circle, square, triangle).
"""
from __future__ import annotations

import os

import caffe
from caffe import layers as L
from caffe import params as P

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 4
SIZE = 96
# feature map (24x24, 12x12, 6x6) -> (min_size, max_size) in pixels; priors per cell: min, max, aspect
# 2 and 1/2; PriorBox's step is the image size over the map's
HEADS = {"conv3": (16, 32), "conv4": (32, 56), "conv5": (56, 88)}
PRIORS_PER_CELL = 4
MEAN = [104, 117, 123]


def body(n, data):
    bottom = data
    for i, width in enumerate([16, 32, 64, 64, 64], 1):
        conv = L.Convolution(bottom, num_output=width, kernel_size=3, pad=1,
                             weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
        setattr(n, f"conv{i}", conv)
        setattr(n, f"relu{i}", L.ReLU(conv, in_place=True))
        if i < 5:
            bottom = L.Pooling(conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
            setattr(n, f"pool{i}", bottom)


def heads(n, data):
    locs, confs, priors = [], [], []
    for name, (min_size, max_size) in HEADS.items():
        src = getattr(n, name)
        for kind, width, out in (("loc", 4, locs), ("conf", NUM_CLASSES, confs)):
            conv = L.Convolution(src, num_output=PRIORS_PER_CELL * width, kernel_size=3, pad=1,
                                 weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
            setattr(n, f"{name}_mbox_{kind}", conv)
            perm = L.Permute(conv, order=[0, 2, 3, 1])
            setattr(n, f"{name}_mbox_{kind}_perm", perm)
            flat = L.Flatten(perm, axis=1)
            setattr(n, f"{name}_mbox_{kind}_flat", flat)
            out.append(flat)
        prior = L.PriorBox(src, data, min_size=float(min_size), max_size=float(max_size), aspect_ratio=[2.0],
                           flip=True, clip=False, variance=[0.1, 0.1, 0.2, 0.2], offset=0.5)
        setattr(n, f"{name}_mbox_priorbox", prior)
        priors.append(prior)
    n.mbox_loc = L.Concat(*locs, axis=1)
    n.mbox_conf = L.Concat(*confs, axis=1)
    n.mbox_priorbox = L.Concat(*priors, axis=2)


def detection_output(n, conf):
    n.detection_out = L.DetectionOutput(n.mbox_loc, conf, n.mbox_priorbox, detection_output_param=dict(
        num_classes=NUM_CLASSES, share_location=True, background_label_id=0,
        nms_param=dict(nms_threshold=0.45, top_k=100), code_type=P.PriorBox.CENTER_SIZE, keep_top_k=20,
        confidence_threshold=0.05), include=dict(phase=caffe.TEST))


def softmax_conf(n):
    n.mbox_conf_reshape = L.Reshape(n.mbox_conf, shape=dict(dim=[0, -1, NUM_CLASSES]))
    n.mbox_conf_softmax = L.Softmax(n.mbox_conf_reshape, axis=2)
    n.mbox_conf_flatten = L.Flatten(n.mbox_conf_softmax, axis=1)
    return n.mbox_conf_flatten


def data_layer(phase: int, source: str, batch: int):
    transform = dict(mean_value=MEAN, resize_param=dict(prob=1.0, resize_mode=P.Resize.WARP, height=SIZE,
                                                        width=SIZE, interp_mode=[P.Resize.LINEAR]))
    samplers = []
    if phase == caffe.TRAIN:
        transform.update(mirror=True, expand_param=dict(prob=0.5, max_expand_ratio=2.0),
                         emit_constraint=dict(emit_type=caffe.proto.caffe_pb2.EmitConstraint.CENTER))
        samplers = [dict(max_sample=1, max_trials=1)] + [
            dict(sampler=dict(min_scale=0.5, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0),
                 sample_constraint=dict(min_jaccard_overlap=overlap), max_sample=1, max_trials=30)
            for overlap in (0.3, 0.5, 0.7)]
    return L.AnnotatedData(name="data", data_param=dict(source=source, batch_size=batch, backend=P.Data.LMDB),
                           transform_param=transform, annotated_data_param=dict(batch_sampler=samplers),
                           ntop=2, include=dict(phase=phase))


def train_test_net() -> str:
    n = caffe.NetSpec()
    n.data, n.label = data_layer(caffe.TRAIN, "examples/ssd/shapes_trainval_lmdb", 16)
    text = str(n.to_proto())
    n = caffe.NetSpec()
    n.data, n.label = data_layer(caffe.TEST, "examples/ssd/shapes_test_lmdb", 10)
    body(n, n.data)
    heads(n, n.data)
    n.mbox_loss = L.MultiBoxLoss(n.mbox_loc, n.mbox_conf, n.mbox_priorbox, n.label, include=dict(phase=caffe.TRAIN),
                                 propagate_down=[True, True, False, False],
                                 loss_param=dict(normalization=P.Loss.VALID), multibox_loss_param=dict(
                                     loc_loss_type=P.MultiBoxLoss.SMOOTH_L1, conf_loss_type=P.MultiBoxLoss.SOFTMAX,
                                     loc_weight=1.0, num_classes=NUM_CLASSES, share_location=True,
                                     match_type=P.MultiBoxLoss.PER_PREDICTION, overlap_threshold=0.5,
                                     use_prior_for_matching=True, background_label_id=0, use_difficult_gt=True,
                                     neg_pos_ratio=3.0, neg_overlap=0.5, code_type=P.PriorBox.CENTER_SIZE,
                                     mining_type=P.MultiBoxLoss.MAX_NEGATIVE))
    conf = softmax_conf(n)
    for layer in ("mbox_conf_reshape", "mbox_conf_softmax", "mbox_conf_flatten"):
        getattr(n, layer).fn.params["include"] = dict(phase=caffe.TEST)
    detection_output(n, conf)
    n.detection_eval = L.DetectionEvaluate(n.detection_out, n.label, include=dict(phase=caffe.TEST),
                                           detection_evaluate_param=dict(num_classes=NUM_CLASSES,
                                                                         background_label_id=0,
                                                                         overlap_threshold=0.5))
    return 'name: "ssd_shapes"\n' + text + str(n.to_proto())


def deploy_net() -> str:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, SIZE, SIZE]))
    body(n, n.data)
    heads(n, n.data)
    conf = softmax_conf(n)
    n.detection_out = L.DetectionOutput(n.mbox_loc, conf, n.mbox_priorbox, detection_output_param=dict(
        num_classes=NUM_CLASSES, share_location=True, background_label_id=0,
        nms_param=dict(nms_threshold=0.45, top_k=100), code_type=P.PriorBox.CENTER_SIZE, keep_top_k=20,
        confidence_threshold=0.3))
    return 'name: "ssd_shapes_deploy"\n' + str(n.to_proto())


if __name__ == "__main__":
    for name, text in (("ssd_shapes_train_test.prototxt", train_test_net()),
                       ("ssd_shapes_deploy.prototxt", deploy_net())):
        with open(os.path.join(HERE, name), "w") as f:
            f.write(text)
        print("wrote", os.path.join(HERE, name))

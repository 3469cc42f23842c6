"""Automatic Split layers: a blob consumed by several layers (or used as a loss and consumed) gets
a Split layer whose tops feed each consumer, so their gradients are summed (Caffe's insert_splits).
"""
from __future__ import annotations

from collections import defaultdict

from .layer import LayerError
from .proto import caffe_pb2


def split_layer_name(layer_name: str, blob_name: str, blob_idx: int) -> str:
    return f"{blob_name}_{layer_name}_{blob_idx}_split"


def split_blob_name(layer_name: str, blob_name: str, blob_idx: int, split_idx: int) -> str:
    return f"{blob_name}_{layer_name}_{blob_idx}_split_{split_idx}"


def insert_splits(param: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    last_top: dict[str, tuple[int, int]] = {}
    source_of_bottom: dict[tuple[int, int], tuple[int, int]] = {}
    uses = defaultdict(int)
    loss_weight: dict[tuple[int, int], float] = {}
    for i, layer in enumerate(param.layer):
        for j, name in enumerate(layer.bottom):
            if name not in last_top:
                raise LayerError(f"Unknown bottom blob '{name}' (layer '{layer.name}', bottom index {j}): "
                                 "no earlier layer produces it")
            src = last_top[name]
            source_of_bottom[(i, j)] = src
            uses[src] += 1
        for j, name in enumerate(layer.top):
            last_top[name] = (i, j)
        # A top used as a loss counts as one more consumer.
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            loss_weight[(i, j)] = layer.loss_weight[j]
            if layer.loss_weight[j]:
                uses[(i, j)] += 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split = defaultdict(int)
    for i, src_layer in enumerate(param.layer):
        layer = out.layer.add()
        layer.CopyFrom(src_layer)
        for j, name in enumerate(layer.bottom):
            src = source_of_bottom[(i, j)]
            if uses[src] > 1:
                layer.bottom[j] = split_blob_name(param.layer[src[0]].name, name, src[1], next_split[src])
                next_split[src] += 1
        for j, name in enumerate(layer.top):
            n = uses[(i, j)]
            if n > 1:
                w = loss_weight.get((i, j), 0.0)
                split = out.layer.add()
                split.name = split_layer_name(layer.name, name, j)
                split.type = "Split"
                split.bottom.append(name)
                for k in range(n):
                    split.top.append(split_blob_name(layer.name, name, j, k))
                    if w:
                        split.loss_weight.append(w if k == 0 else 0.0)
                if w:
                    del layer.loss_weight[:]
                    next_split[(i, j)] += 1
    return out

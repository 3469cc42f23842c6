"""Net: a DAG of layers built from a NetParameter, with Caffe's exact initialization rules.

Construction follows Caffe's Net::Init: filter layers by NetState, insert Split layers, create
each layer, connect bottoms/tops (in place when a top reuses its bottom's name), share params by
name, and decide which layers and bottoms need backward (``propagate_down``, ``lr_mult: 0``,
loss contribution, ``force_backward``), logging the same lines Caffe logs.

Parameter diffs *accumulate* across ``backward`` calls; the solver (or you) clears them with
``clear_param_diffs()``. Bottom diffs are overwritten.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from google.protobuf import text_format

from . import device as _device
from . import fastpath as _fastpath
from . import precision as _precision
from .blob import Blob, BlobError, proto_shape
from .insert_splits import insert_splits
from .io import hdf5_weights
from .io.fork_fields import unimplemented_fields
from .io.netfiles import read_net_binary, read_net_text
from .io.upgrade import upgrade_net
from .io.protofiles import check_path, write_binary
from .layer import Layer, LayerError, create_layer
from .log import get_logger
from .net_state import filter_net
from .proto import caffe_pb2
from .errors import RecaffeError

log = get_logger(__name__)

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


class WeightsError(RecaffeError, ValueError):
    """Weights that do not fit the net; the message names the layer and both shapes."""


class Net:
    def __init__(self, param: caffe_pb2.NetParameter | str | os.PathLike, phase: int | None = None,
                 level: int = 0, stages: Sequence[str] = (), weights: str | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 precision: str | None = None):
        if isinstance(param, (str, os.PathLike)):
            source = os.fspath(param)
            param = read_net_text(source)
        else:
            p = caffe_pb2.NetParameter()
            p.CopyFrom(param)
            param = upgrade_net(p)
        if phase is not None:
            param.state.phase = phase
            param.state.level = level
            param.state.stage.extend(s for s in stages if s not in param.state.stage)
        elif not param.HasField("state") or not param.state.HasField("phase"):
            param.state.phase = param.state.phase  # TEST by default, as NetState's default
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else _device.current_device()
        self._requested_precision = _precision.check_name(precision) if precision is not None else None
        self._init(param)
        if weights is not None:
            self.copy_from(weights)

    # ------------------------------------------------------------------ init
    def _init(self, in_param: caffe_pb2.NetParameter) -> None:
        self.phase = in_param.state.phase
        filtered = filter_net(in_param)
        log.info("Initializing net from parameters: \n%s", text_format.MessageToString(filtered))
        nv = unimplemented_fields(filtered)
        if nv:
            log.warning("NVCaffe's fields %s are read but not used", ", ".join(nv))
        self.precision = _precision.Plan(filtered, self._requested_precision, self.dtype)
        if self.precision.low is not None:
            log.info("Mixed precision: %s", self.precision.describe())
        # backward starts from loss_weight * loss_scale: 1 for a net of its own; a solver sets its
        # LossScaler's scale (float16) and unscales the param diffs before the update
        self.loss_scale = 1.0
        param = insert_splits(filtered)
        self.param = param
        self.name = param.name
        self.layers: list[Layer] = []
        self._layer_names: list[str] = []
        self._blobs: list[Blob] = []
        self._blob_names: list[str] = []
        self._blob_need_backward: list[bool] = []
        self._blob_loss_weights: list[float] = []
        self.bottom_vecs: list[list[Blob]] = []
        self.top_vecs: list[list[Blob]] = []
        self.bottom_id_vecs: list[list[int]] = []
        self.top_id_vecs: list[list[int]] = []
        self.bottom_need_backward: list[list[bool]] = []
        # per layer: None, or the converted copies it runs on (precision.LayerCast)
        self._casts: list[_precision.LayerCast | None] = []
        self.layer_need_backward: list[bool] = []
        self._params: list[Blob] = []
        self._param_owners: list[int] = []
        self._param_display_names: list[str] = []
        self._param_layer_indices: list[tuple[int, int]] = []
        self._param_names_index: dict[str, int] = {}
        self.learnable_params: list[Blob] = []
        self.params_lr: list[float] = []
        self.params_weight_decay: list[float] = []
        self._has_params_lr: list[bool] = []
        self._has_params_decay: list[bool] = []
        self._learnable_param_ids: list[int] = []
        self._input_blob_indices: list[int] = []
        self._output_blob_indices: list[int] = []
        available: OrderedDict[str, None] = OrderedDict()
        name_to_idx: dict[str, int] = {}
        memory_bytes = 0

        for layer_id, lp in enumerate(param.layer):
            if not lp.HasField("phase"):
                lp.phase = self.phase
            if len(lp.propagate_down) not in (0, len(lp.bottom)):
                raise LayerError(f"layer {lp.name!r}: propagate_down must be given either 0 or "
                                 f"{len(lp.bottom)} (bottom count) times, got {len(lp.propagate_down)}")
            log.info("Creating layer %s", lp.name)
            layer_dtype = self._layer_dtype(lp, name_to_idx)
            layer = create_layer(lp, dtype=layer_dtype, device=self.device)
            self.layers.append(layer)
            self._layer_names.append(lp.name)
            log.info("Creating Layer %s", lp.name)
            self.bottom_vecs.append([])
            self.top_vecs.append([])
            self.bottom_id_vecs.append([])
            self.top_id_vecs.append([])
            self.bottom_need_backward.append([])
            need_backward = False
            for bottom_id, name in enumerate(lp.bottom):
                blob_id = self._append_bottom(lp, layer_id, bottom_id, available, name_to_idx)
                need_backward |= self._blob_need_backward[blob_id]
            for top_id in range(len(lp.top)):
                self._append_top(lp, layer_id, top_id, available, name_to_idx)
                if lp.type == "Input":
                    self._input_blob_indices.append(len(self._blobs) - 1)
            if layer.auto_top_blobs:
                needed = max(layer.min_top_blobs, layer.exact_num_top_blobs)
                for _ in range(len(lp.top), needed):
                    self._append_top(lp, layer_id, None, None, None)
            in_place = [(i, b, b.shape) for i, b in enumerate(self.bottom_vecs[layer_id])
                        if any(b is t for t in self.top_vecs[layer_id])]
            cast = _precision.LayerCast(layer_dtype, self.bottom_vecs[layer_id], self.top_vecs[layer_id])
            self._casts.append(cast if cast.converts else None)
            try:
                if cast.converts:
                    cast.before_forward()
                    layer.setup(cast.bottoms, cast.tops)
                    cast.reshape_tops()
                else:
                    layer.setup(self.bottom_vecs[layer_id], self.top_vecs[layer_id])
            except LayerError:
                raise
            except (ValueError, RuntimeError, IndexError) as e:
                if layer.runs_user_code:
                    raise
                raise LayerError(f"{lp.type} layer {lp.name!r} failed to set up: {e}") from e
            for i, blob, shape in in_place:
                if blob.shape != shape:  # Pooling, Convolution, ... cannot overwrite their input
                    raise LayerError(f"{lp.type} layer {lp.name!r} cannot compute in place: its top "
                                     f"{lp.bottom[i]!r} would change shape from {_fmt_shape(shape)} to "
                                     f"{_fmt_shape(blob.shape)}; give the top another name")
            log.info("Setting up %s", lp.name)
            for top_id, top in enumerate(self.top_vecs[layer_id]):
                blob_id = self.top_id_vecs[layer_id][top_id]
                memory_bytes += top.count() * torch.finfo(top.dtype).bits // 8
                w = layer.loss_weights[top_id] if layer.loss_weights else 0.0
                while len(self._blob_loss_weights) <= blob_id:
                    self._blob_loss_weights.append(0.0)
                self._blob_loss_weights[blob_id] = w
                log.info("Top shape: %s", _shape_string(top))
                if w:
                    log.info("    with loss weight %g", w)
            log.info("Memory required for data: %d", memory_bytes)
            num_param_blobs = len(layer.blobs)
            if len(lp.param) > num_param_blobs:
                raise LayerError(f"layer {lp.name!r}: too many params specified ({len(lp.param)} param "
                                 f"entries for {num_param_blobs} param blobs)")
            if len(layer.param_propagate_down) < num_param_blobs:
                layer.param_propagate_down += [True] * (num_param_blobs - len(layer.param_propagate_down))
            for param_id in range(num_param_blobs):
                spec = lp.param[param_id] if param_id < len(lp.param) else caffe_pb2.ParamSpec()
                param_need_backward = spec.lr_mult != 0
                need_backward |= param_need_backward
                layer.param_propagate_down[param_id] = param_need_backward
            for param_id in range(num_param_blobs):
                self._append_param(lp, layer_id, param_id)
            self.layer_need_backward.append(need_backward)
            if need_backward:
                for blob_id in self.top_id_vecs[layer_id]:
                    self._blob_need_backward[blob_id] = True

        self._prune_backward(param)
        self._plan_releases()
        self._fastpath = None
        if _fastpath.compile_mode():
            self.set_compile(_fastpath.compile_mode())
        for name in available:
            log.info("This network produces output %s", name)
            self._output_blob_indices.append(name_to_idx[name])
        self._blob_names_index = {n: i for i, n in enumerate(self._blob_names)}
        self._layer_names_index = {n: i for i, n in enumerate(self._layer_names)}
        self._share_weights()
        self._callbacks: dict[str, list] = {k: [] for k in ("before_forward", "after_forward",
                                                            "before_backward", "after_backward")}
        log.info("Network initialization done.")

    def _layer_dtype(self, lp, name_to_idx) -> torch.dtype:
        """The compute type of layer ``lp`` (precision.Plan); a layer computing in place on a blob
        of another type runs on a converted copy of it."""
        bottoms = [self._blobs[name_to_idx[n]] for n in lp.bottom if n in name_to_idx]
        return self.precision.layer_dtype(lp, bottoms)

    def _append_top(self, lp, layer_id, top_id, available, name_to_idx) -> None:
        name = lp.top[top_id] if top_id is not None else "(automatic)"
        if top_id is not None and top_id < len(lp.bottom) and name == lp.bottom[top_id]:
            log.info("%s -> %s (in-place)", lp.name, name)
            blob_id = name_to_idx[name]
            self.top_vecs[layer_id].append(self._blobs[blob_id])
            self.top_id_vecs[layer_id].append(blob_id)
        elif name_to_idx is not None and name in name_to_idx:
            raise LayerError(f"Top blob '{name}' produced by multiple sources (layer {lp.name!r}); "
                             "only a layer's own bottom at the same index may be reused in place")
        else:
            if name_to_idx is not None:
                log.info("%s -> %s", lp.name, name)
            blob = Blob((), self.layers[layer_id].dtype, self.device)
            blob_id = len(self._blobs)
            self._blobs.append(blob)
            self._blob_names.append(name)
            self._blob_need_backward.append(False)
            if name_to_idx is not None:
                name_to_idx[name] = blob_id
            self.top_vecs[layer_id].append(blob)
            self.top_id_vecs[layer_id].append(blob_id)
        if available is not None:
            available[name] = None

    def _append_bottom(self, lp, layer_id, bottom_id, available, name_to_idx) -> int:
        name = lp.bottom[bottom_id]
        if name not in available:
            raise LayerError(f"Unknown bottom blob '{name}' (layer '{lp.name}', bottom index {bottom_id})")
        blob_id = name_to_idx[name]
        log.info("%s <- %s", lp.name, name)
        self.bottom_vecs[layer_id].append(self._blobs[blob_id])
        self.bottom_id_vecs[layer_id].append(blob_id)
        del available[name]
        need = self._blob_need_backward[blob_id]
        if len(lp.propagate_down):
            need = lp.propagate_down[bottom_id]
        self.bottom_need_backward[layer_id].append(need)
        return blob_id

    def _append_param(self, lp, layer_id, param_id) -> None:
        layer = self.layers[layer_id]
        spec = lp.param[param_id] if param_id < len(lp.param) else None
        param_name = spec.name if spec is not None else ""
        net_param_id = len(self._params)
        self._params.append(layer.blobs[param_id])
        self._param_layer_indices.append((layer_id, param_id))
        self._param_display_names.append(param_name or str(param_id))
        if not param_name or param_name not in self._param_names_index:
            # This layer owns the param.
            self._param_owners.append(-1)
            if param_name:
                self._param_names_index[param_name] = net_param_id
            self._learnable_param_ids.append(len(self.learnable_params))
            self.learnable_params.append(layer.blobs[param_id])
            self._has_params_lr.append(spec is not None and spec.HasField("lr_mult"))
            self._has_params_decay.append(spec is not None and spec.HasField("decay_mult"))
            self.params_lr.append(spec.lr_mult if spec is not None else 1.0)
            self.params_weight_decay.append(spec.decay_mult if spec is not None else 1.0)
            return
        # Shared param: check shapes now; the blob is tied to its owner in _share_weights.
        owner_net_id = self._param_names_index[param_name]
        self._param_owners.append(owner_net_id)
        owner_layer_id, owner_param_id = self._param_layer_indices[owner_net_id]
        log.info("Sharing parameters '%s' owned by layer '%s', param index %d", param_name,
                 self._layer_names[owner_layer_id], owner_param_id)
        this_blob = layer.blobs[param_id]
        owner_blob = self.layers[owner_layer_id].blobs[owner_param_id]
        if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
            if this_blob.count() != owner_blob.count():
                raise LayerError(f"Cannot share param '{param_name}' owned by layer "
                                 f"'{self._layer_names[owner_layer_id]}' with layer '{lp.name}'; count mismatch. "
                                 f"Owner layer param shape is {owner_blob.shape}; sharing layer shape is "
                                 f"{this_blob.shape}")
        elif this_blob.shape != owner_blob.shape:
            raise LayerError(f"Cannot share param '{param_name}' owned by layer "
                             f"'{self._layer_names[owner_layer_id]}' with layer '{lp.name}'; shape mismatch. "
                             f"Owner layer param shape is {owner_blob.shape}; sharing layer expects shape "
                             f"{this_blob.shape}")
        learnable_id = self._learnable_param_ids[owner_net_id]
        self._learnable_param_ids.append(learnable_id)
        if spec.HasField("lr_mult"):
            if self._has_params_lr[learnable_id]:
                if spec.lr_mult != self.params_lr[learnable_id]:
                    raise LayerError(f"Shared param '{param_name}' has mismatched lr_mult in layer '{lp.name}'")
            else:
                self._has_params_lr[learnable_id] = True
                self.params_lr[learnable_id] = spec.lr_mult
        if spec.HasField("decay_mult"):
            if self._has_params_decay[learnable_id]:
                if spec.decay_mult != self.params_weight_decay[learnable_id]:
                    raise LayerError(f"Shared param '{param_name}' has mismatched decay_mult in layer '{lp.name}'")
            else:
                self._has_params_decay[learnable_id] = True
                self.params_weight_decay[learnable_id] = spec.decay_mult

    def _share_weights(self) -> None:
        for i, owner in enumerate(self._param_owners):
            if owner < 0:
                continue
            layer_id, param_id = self._param_layer_indices[i]
            owner_blob = self._params[owner]
            if self._params[i].shape == owner_blob.shape:
                # The same Blob object: data and diff are one, wherever they are read or written.
                self.layers[layer_id].blobs[param_id] = owner_blob
                self._params[i] = owner_blob
            else:
                self._params[i].share_data(owner_blob)
                self._params[i].share_diff(owner_blob)

    def _prune_backward(self, param) -> None:
        """Caffe's backward analysis: skip layers that do not reach a loss or whose tops need no
        gradient, then apply force_backward; logs a line per layer, last to first."""
        under_loss: set[str] = set()
        skip_backp: set[str] = set()
        for layer_id in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[layer_id]
            contributes_loss = False
            skip_propagate_down = True
            for top_id, blob_id in enumerate(self.top_id_vecs[layer_id]):
                name = self._blob_names[blob_id]
                if (layer.loss_weights and layer.loss_weights[top_id]) or name in under_loss:
                    contributes_loss = True
                if name not in skip_backp:
                    skip_propagate_down = False
                if contributes_loss and not skip_propagate_down:
                    break
            if self.layer_need_backward[layer_id] and skip_propagate_down:
                self.layer_need_backward[layer_id] = False
                self.bottom_need_backward[layer_id] = [False] * len(self.bottom_need_backward[layer_id])
            if not contributes_loss:
                self.layer_need_backward[layer_id] = False
            if self.layer_need_backward[layer_id]:
                log.info("%s needs backward computation.", self._layer_names[layer_id])
            else:
                log.info("%s does not need backward computation.", self._layer_names[layer_id])
            for bottom_id, blob_id in enumerate(self.bottom_id_vecs[layer_id]):
                name = self._blob_names[blob_id]
                if contributes_loss:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[layer_id][bottom_id] = False
                if not self.bottom_need_backward[layer_id][bottom_id]:
                    skip_backp.add(name)
        if param.force_backward:
            for layer_id, layer in enumerate(self.layers):
                self.layer_need_backward[layer_id] = True
                for bottom_id, blob_id in enumerate(self.bottom_id_vecs[layer_id]):
                    need = self.bottom_need_backward[layer_id][bottom_id] or layer.allow_force_backward(bottom_id)
                    self.bottom_need_backward[layer_id][bottom_id] = need
                    self._blob_need_backward[blob_id] = self._blob_need_backward[blob_id] or need
                layer.param_propagate_down = [True] * len(layer.blobs)

    def _plan_releases(self) -> None:
        """Which blobs each layer may replace, so that their old tensors go before the new ones
        are computed: per layer, the tops that are not also bottoms; the bottoms backward
        propagates to that are not also tops. Whether the layer does replace them is asked at
        each run (Layer.replaces_tops, replaces_bottom_diffs: a layer that writes into the
        blobs' own memory, as a large Convolution does, keeps them)."""
        self._forward_releases = [
            [t for t in tops if not any(t is b for b in bottoms)]
            for bottoms, tops in zip(self.bottom_vecs, self.top_vecs)]
        self._backward_releases = [
            [b for b, down in zip(bottoms, prop) if down and not any(b is t for t in tops)]
            for bottoms, tops, prop in zip(self.bottom_vecs, self.top_vecs, self.bottom_need_backward)]

    # ------------------------------------------------------------ running
    def set_compile(self, mode: bool | str = True) -> None:
        """Run this net's whole-net forward/backward through the compiled fast path (True or
        "auto": per segment, whichever of eager and compiled measures faster; "always"), or
        eagerly again (False). See recaffe/fastpath.py."""
        if mode not in (True, False, None, "auto", "always"):
            raise ValueError(f"set_compile: expected True, False, 'auto' or 'always', got {mode!r}")
        for layer in self.layers:  # the fast path's layout choice (channels-last convolutions)
            if getattr(layer, "channels_last", False):
                layer.channels_last = False
        self._fastpath = _fastpath.FastPath(self, "auto" if mode is True else mode) if mode else None

    @property
    def fastpath(self) -> "_fastpath.FastPath | None":
        return self._fastpath

    def forward_from_to(self, start: int = 0, end: int | None = None) -> float:
        end = len(self.layers) - 1 if end is None else end
        if self._fastpath is not None and start == 0 and end == len(self.layers) - 1 and self._fastpath.active:
            return self._fastpath.forward()
        loss = 0.0
        layers, bottoms, tops, casts = self.layers, self.bottom_vecs, self.top_vecs, self._casts
        before, after = self._callbacks["before_forward"], self._callbacks["after_forward"]
        releases = self._forward_releases
        for i in range(start, end + 1):
            for run in before:
                run(i)
            if layers[i].replaces_tops:
                for blob in releases[i]:
                    blob.release_data()
            if casts[i] is None:
                loss += layers[i].run_forward(bottoms[i], tops[i])
            else:
                loss += self.forward_layer(i)
            for run in after:
                run(i)
        return loss

    def forward_layer(self, i: int) -> float:
        """Layer ``i``'s forward (Layer.run_forward), through its converted copies when it has them."""
        cast = self._casts[i]
        if cast is None:
            return self.layers[i].run_forward(self.bottom_vecs[i], self.top_vecs[i])
        cast.before_forward()
        loss = self.layers[i].run_forward(cast.bottoms, cast.tops)
        cast.after_forward()
        return loss

    def backward_layer(self, i: int) -> None:
        """Layer ``i``'s backward: a loss layer's top diffs scaled by ``loss_scale`` for its
        duration, converted copies where it has them."""
        layer, prop = self.layers[i], self.bottom_need_backward[i]
        scaled = self.loss_scale != 1 and layer.loss_weights
        if scaled:
            for t, w in zip(self.top_vecs[i], layer.loss_weights):
                if w:
                    t.diff_t.mul_(self.loss_scale)
        cast = self._casts[i]
        if cast is None:
            layer.backward(self.top_vecs[i], prop, self.bottom_vecs[i])
        else:
            cast.before_backward()
            layer.backward(cast.tops, prop, cast.bottoms)
            cast.after_backward(prop)
        if scaled:
            for t, w in zip(self.top_vecs[i], layer.loss_weights):
                if w:
                    t.diff_t.div_(self.loss_scale)

    def backward_from_to(self, start: int | None = None, end: int = 0) -> None:
        start = len(self.layers) - 1 if start is None else start
        if self._fastpath is not None and start == len(self.layers) - 1 and end == 0 and self._fastpath.active:
            self._fastpath.backward()
            return
        layers, bottoms, tops = self.layers, self.bottom_vecs, self.top_vecs
        need, prop = self.layer_need_backward, self.bottom_need_backward
        before, after = self._callbacks["before_backward"], self._callbacks["after_backward"]
        direct = self.loss_scale == 1
        casts = self._casts
        releases = self._backward_releases
        for i in range(start, end - 1, -1):
            for run in before:
                run(i)
            if need[i]:
                if layers[i].replaces_bottom_diffs:
                    for blob in releases[i]:
                        blob.release_diff()
                if direct and casts[i] is None:
                    layers[i].backward(tops[i], prop[i], bottoms[i])
                else:
                    self.backward_layer(i)
            for run in after:
                run(i)

    # pycaffe's net callbacks: ``run(layer_index)`` around each layer's forward or backward (the
    # backward ones also for layers that need no backward), in the order added, as Caffe's Net.
    def before_forward(self, run) -> None:
        self._callbacks["before_forward"].append(run)

    def after_forward(self, run) -> None:
        self._callbacks["after_forward"].append(run)

    def before_backward(self, run) -> None:
        self._callbacks["before_backward"].append(run)

    def after_backward(self, run) -> None:
        self._callbacks["after_backward"].append(run)

    def forward_loss(self) -> float:
        """Run the whole net forward and return the total weighted loss (Caffe's Net::Forward)."""
        return self.forward_from_to(0, len(self.layers) - 1)

    def forward(self, blobs: Sequence[str] | None = None, start: str | None = None, end: str | None = None,
                **kwargs) -> dict[str, np.ndarray]:
        """pycaffe's ``net.forward``: set inputs from ``kwargs``, run from layer ``start`` to ``end``,
        return the output blobs (or ``end``'s tops) plus any ``blobs`` named, as numpy arrays."""
        outputs = set(self.outputs if end is None else
                      [self._blob_names[i] for i in self.top_id_vecs[self._layer_index(end)]])
        outputs.update(blobs or ())
        self._write_batch(kwargs, self.inputs, "input", "Input", "data")
        start_i = self._layer_index(start) if start is not None else 0
        end_i = self._layer_index(end) if end is not None else len(self.layers) - 1
        self.forward_from_to(start_i, end_i)
        return {name: self.blobs[name].data for name in self._ordered(outputs)}

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None, end: str | None = None,
                 **kwargs) -> dict[str, np.ndarray]:
        """pycaffe's ``net.backward``: set output diffs from ``kwargs``, run backward from layer
        ``start`` down to ``end``, return the input blobs' (or ``end``'s bottoms') diffs."""
        outputs = set(self.inputs if end is None else
                      [self._blob_names[i] for i in self.bottom_id_vecs[self._layer_index(end)]])
        outputs.update(diffs or ())
        self._write_batch(kwargs, self.outputs, "output", "Top diff", "diff")
        start_i = self._layer_index(start) if start is not None else len(self.layers) - 1
        end_i = self._layer_index(end) if end is not None else 0
        self.backward_from_to(start_i, end_i)
        return {name: self.blobs[name].diff for name in self._ordered(outputs)}

    def _write_batch(self, values: dict, allowed: list[str], role: str, what: str, field: str) -> None:
        """Write pycaffe keyword arrays into blobs' ``data``/``diff``, checking names and batch size."""
        for name, value in values.items():
            if name not in allowed:
                raise KeyError(f"{name!r} is not an {role} blob of this net ({role}s: {allowed})")
            blob = self.blobs[name]
            value = np.asarray(value)
            if value.shape[:1] != blob.shape[:1]:
                raise ValueError(f"{what} {name!r} is not batch sized: got shape {value.shape}, "
                                 f"the blob has shape {blob.shape}")
            getattr(blob, field)[...] = value

    def _batches(self, arrays: dict) -> list[dict[str, np.ndarray]]:
        """Split same-length arrays into batches of the net's batch size (the first blob's first
        dimension, as pycaffe), zero-padding the last one."""
        if not arrays:
            return []
        batch = self._blobs[0].shape[0]
        n = len(next(iter(arrays.values())))
        out = []
        for start in range(0, n, batch):
            chunk = {}
            for name, value in arrays.items():
                part = np.asarray(value[start:start + batch])
                if len(part) < batch:  # pad the last batch, as pycaffe does
                    pad = np.zeros((batch - len(part),) + part.shape[1:], dtype=part.dtype)
                    part = np.concatenate([part, pad])
                chunk[name] = part
            out.append(chunk)
        return out

    def forward_all(self, blobs: Sequence[str] | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Run forward over inputs of any length in batches of the net's batch size (pycaffe)."""
        all_outs: dict[str, list[np.ndarray]] = {out: [] for out in set(self.outputs + list(blobs or []))}
        if not kwargs:
            out = self.forward(blobs=blobs)
            return {k: v.copy() for k, v in out.items()}
        for chunk in self._batches(kwargs):
            out = self.forward(blobs=blobs, **chunk)
            for k, v in out.items():
                all_outs[k].append(v.copy())
        n = len(next(iter(kwargs.values())))
        return {k: np.concatenate(v)[:n] for k, v in all_outs.items()}

    def forward_backward_all(self, blobs: Sequence[str] | None = None, diffs: Sequence[str] | None = None,
                             **kwargs) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """pycaffe's ``net.forward_backward_all``: forward then backward over batches; inputs
        (keyword arrays named after input blobs) and output diffs (named after output blobs)
        of any common length. Returns (outputs + ``blobs``, input diffs + ``diffs``), padding cut."""
        forward_batches = self._batches({k: v for k, v in kwargs.items() if k in self.inputs})
        backward_batches = self._batches({k: v for k, v in kwargs.items() if k in self.outputs})
        unknown = set(kwargs) - set(self.inputs) - set(self.outputs)
        if unknown:
            raise KeyError(f"{sorted(unknown)} are neither input nor output blobs of this net "
                           f"(inputs: {self.inputs}, outputs: {self.outputs})")
        all_outs: dict[str, list[np.ndarray]] = {k: [] for k in set(self.outputs + list(blobs or []))}
        all_diffs: dict[str, list[np.ndarray]] = {k: [] for k in set(self.inputs + list(diffs or []))}
        for i in range(max(len(forward_batches), len(backward_batches), 1)):
            fb = forward_batches[i] if i < len(forward_batches) else {}
            bb = backward_batches[i] if i < len(backward_batches) else {}
            for k, v in self.forward(blobs=blobs, **fb).items():
                all_outs[k].append(v.copy())
            for k, v in self.backward(diffs=diffs, **bb).items():
                all_diffs[k].append(v.copy())
        n = len(next(iter(kwargs.values()))) if kwargs else None
        return ({k: np.concatenate(v)[:n] for k, v in all_outs.items()},
                {k: np.concatenate(v)[:n] for k, v in all_diffs.items()})

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """pycaffe's ``net.set_input_arrays``: feed a MemoryData first layer (which keeps the arrays)."""
        if not self.layers or self.layers[0].type != "MemoryData":
            raise RuntimeError("set_input_arrays may only be called if the first layer is a MemoryDataLayer")
        self.layers[0].set_input_arrays(data, labels)

    def reshape(self) -> None:
        for layer, bottom, top in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottom, top)

    def clear_param_diffs(self) -> None:
        if self.learnable_params:
            torch._foreach_zero_([blob.diff_t for blob in self.learnable_params])

    def update(self) -> None:
        """data -= diff for every learnable param (Caffe's Net::Update)."""
        params = self.learnable_params
        if params:
            torch._foreach_sub_([b.data_t for b in params], [b.diff_t for b in params])

    # ------------------------------------------------------------ weights
    def copy_trained_layers_from(self, param: caffe_pb2.NetParameter, source: str = "<weights>") -> None:
        if not len(param.layer):
            raise WeightsError(f"{source}: holds no layers: not a .caffemodel, or an empty or truncated one")
        copied = 0
        for src in param.layer:
            idx = self._layer_names_index.get(src.name)
            if idx is None:
                log.info("Ignoring source layer %s", src.name)
                continue
            copied += 1
            log.info("Copying source layer %s Type:%s #blobs=%d", src.name, src.type, len(src.blobs))
            target = self.layers[idx].blobs
            if len(target) != len(src.blobs):
                raise WeightsError(f"{source}: incompatible number of blobs for layer {src.name!r}: the file "
                                   f"has {len(src.blobs)}, the net expects {len(target)}")
            for j, proto in enumerate(src.blobs):
                if not target[j].shape_equals(proto):
                    raise WeightsError(
                        f"{source}: cannot copy param {j} weights from layer '{src.name}'; shape mismatch. "
                        f"Source param shape is {_fmt_shape(proto_shape(proto))}; target param shape is "
                        f"{_fmt_shape(target[j].shape)}. To learn this layer's parameters from scratch rather "
                        "than copying from a saved net, rename the layer.")
                try:
                    target[j].from_proto(proto, reshape=False, where=f"{source}: layer {src.name!r} param {j}")
                except BlobError as e:
                    raise WeightsError(str(e)) from None
        if not copied:
            log.warning("None of the %d layers in %s matches a layer of net %s by name: no weights were "
                        "copied", len(param.layer), source, self.name)

    def copy_from(self, filename: str | os.PathLike) -> None:
        """Load weights by layer name from a ``.caffemodel`` or Caffe's HDF5 weights
        (``.caffemodel.h5``, recognized by content as Caffe does) — pycaffe's ``net.copy_from``."""
        filename = check_path(filename)
        if hdf5_weights.is_hdf5(filename):
            try:
                hdf5_weights.load_net(self, filename)
            except RecaffeError:
                raise
            except (KeyError, IndexError, ValueError, TypeError, OSError) as e:  # h5py on a wrong layout
                raise WeightsError(f"{filename}: not Caffe HDF5 weights ({type(e).__name__}: {e})") from None
        elif filename.endswith(".h5") and os.path.isfile(filename):
            raise WeightsError(f"{filename}: named .h5 but not an HDF5 file (HDF5 weights are recognized by "
                               "their content, as Caffe does)")
        else:
            self.copy_trained_layers_from(read_net_binary(filename), filename)

    def save_hdf5(self, filename: str | os.PathLike, write_diff: bool = False) -> None:
        hdf5_weights.save_net(self, os.fspath(filename), write_diff)

    def load_hdf5(self, filename: str | os.PathLike) -> None:
        hdf5_weights.load_net(self, os.fspath(filename))

    def param_id(self, layer_id: int, param_index: int) -> int:
        """The net-wide index of a layer's param blob (Caffe's param_id_vecs_)."""
        return self._param_layer_indices.index((layer_id, param_index))

    def to_proto(self, write_diff: bool = False) -> caffe_pb2.NetParameter:
        out = caffe_pb2.NetParameter()
        out.name = self.name
        for layer in self.layers:
            lp = out.layer.add()
            lp.CopyFrom(layer.layer_param)
            del lp.blobs[:]
            for b in layer.blobs:
                lp.blobs.add().CopyFrom(b.to_proto(write_diff))
        return out

    def save(self, filename: str | os.PathLike, write_diff: bool = False) -> None:
        """Write the weights as a binary ``.caffemodel`` (atomically)."""
        write_binary(filename, self.to_proto(write_diff))

    # ------------------------------------------------------- pycaffe views
    @property
    def blobs(self) -> "OrderedDict[str, Blob]":
        return OrderedDict(zip(self._blob_names, self._blobs))

    @property
    def params(self) -> "OrderedDict[str, list[Blob]]":
        return OrderedDict((n, l.blobs) for n, l in zip(self._layer_names, self.layers) if l.blobs)

    @property
    def layer_dict(self) -> "OrderedDict[str, Layer]":
        return OrderedDict(zip(self._layer_names, self.layers))

    @property
    def inputs(self) -> list[str]:
        return [self._blob_names[i] for i in self._input_blob_indices]

    @property
    def outputs(self) -> list[str]:
        return [self._blob_names[i] for i in self._output_blob_indices]

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        return OrderedDict(zip(self._blob_names, self._blob_loss_weights))

    @property
    def top_names(self) -> "OrderedDict[str, list[str]]":
        return OrderedDict((n, [self._blob_names[i] for i in ids])
                           for n, ids in zip(self._layer_names, self.top_id_vecs))

    @property
    def bottom_names(self) -> "OrderedDict[str, list[str]]":
        return OrderedDict((n, [self._blob_names[i] for i in ids])
                           for n, ids in zip(self._layer_names, self.bottom_id_vecs))

    @property
    def layer_names(self) -> list[str]:
        return list(self._layer_names)

    def has_blob(self, name: str) -> bool:
        return name in self._blob_names_index

    def blob_by_name(self, name: str) -> Blob:
        return self._blobs[self._blob_names_index[name]]

    def has_layer(self, name: str) -> bool:
        return name in self._layer_names_index

    def layer_by_name(self, name: str) -> Layer:
        return self.layers[self._layer_names_index[name]]

    def _layer_index(self, name: str) -> int:
        try:
            return self._layer_names_index[name]
        except KeyError:
            raise KeyError(f"no layer named {name!r} in net {self.name!r}") from None

    def _ordered(self, names) -> list[str]:
        return sorted(names, key=lambda n: self._blob_names_index[n])

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s params for layers of the same name (Caffe's ShareTrainedLayersWith)."""
        for src_name, src_layer in zip(other._layer_names, other.layers):
            idx = self._layer_names_index.get(src_name)
            if idx is None:
                continue
            target = self.layers[idx]
            if len(target.blobs) != len(src_layer.blobs):
                raise WeightsError(f"incompatible number of blobs for layer {src_name!r}")
            for j, b in enumerate(src_layer.blobs):
                if target.blobs[j].shape != b.shape:
                    raise WeightsError(f"cannot share param {j} of layer {src_name!r}: shape {b.shape} vs "
                                       f"{target.blobs[j].shape}")
                target.blobs[j] = b
        self._params = [l.blobs[p] for l, p in ((self.layers[i], j) for i, j in self._param_layer_indices)]
        self.learnable_params = [self._params[i] for i, o in enumerate(self._param_owners) if o < 0]


def _shape_string(blob: Blob) -> str:
    return "".join(f"{d} " for d in blob.shape) + f"({blob.count()})"


def _fmt_shape(shape) -> str:
    return "".join(f"{d} " for d in shape) + f"({int(np.prod(shape)) if len(shape) else 1})"

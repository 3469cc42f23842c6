"""MemoryData: batches served from arrays held in memory (pycaffe's ``net.set_input_arrays``)."""
from __future__ import annotations

import numpy as np
import torch

from ..layer import Layer, register
from ..log import get_logger

log = get_logger(__name__)


@register("MemoryData")
class MemoryDataLayer(Layer):
    """Tops data (batch_size, channels, height, width) and label, from arrays given with
    :meth:`set_input_arrays` (or :meth:`reset`).

    Each forward serves the next ``batch_size`` rows, wrapping around to the first after the
    last, as views of the arrays (no copy when the net is float32 on the CPU, as Caffe points its
    tops at the arrays): the layer keeps references to them. As in Caffe, arrays are not
    transformed (a ``transform_param`` only brings a warning), and after a forward the label top
    has Caffe's shape (batch_size, 1, 1, 1).
    """

    exact_num_bottom_blobs = 0
    exact_num_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.memory_data_param
        self.batch_size, self.channels, self.height, self.width = (
            int(p.batch_size), int(p.channels), int(p.height), int(p.width))
        if self.batch_size * self.channels * self.height * self.width <= 0:
            raise self.error("batch_size, channels, height, and width must be specified and positive in "
                             "memory_data_param")
        top[0].reshape((self.batch_size, self.channels, self.height, self.width))
        top[1].reshape((self.batch_size,))
        self._data = self._labels = None
        self._arrays = None
        self._pos = 0

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """pycaffe's checks, then :meth:`reset`: ``data`` C-contiguous float32 (N, C, H, W) matching
        memory_data_param, ``labels`` float32 (N,) or (N, 1, 1, 1), N a multiple of batch_size."""
        if isinstance(labels, np.ndarray) and labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, None, None, None])
        for arr, name, chw in ((data, "data array", (self.channels, self.height, self.width)),
                               (labels, "labels array", (1, 1, 1))):
            if not isinstance(arr, np.ndarray):
                raise self.error(f"{name} must be a numpy array, got {type(arr).__name__}")
            if not arr.flags.c_contiguous:
                raise self.error(f"{name} must be C contiguous")
            if arr.ndim != 4:
                raise self.error(f"{name} must be 4-d, got shape {arr.shape}")
            if arr.dtype != np.float32:
                raise self.error(f"{name} must be float32, got {arr.dtype}")
            for axis, what in enumerate(("number of channels", "height", "width"), 1):
                if arr.shape[axis] != chw[axis - 1]:
                    raise self.error(f"{name} has wrong {what}: shape {arr.shape}, memory_data_param "
                                     f"wants (N, {', '.join(map(str, chw))})")
        if data.shape[0] != labels.shape[0]:
            raise self.error(f"data and labels must have the same first dimension ({data.shape[0]} vs "
                             f"{labels.shape[0]})")
        self.reset(data, labels)

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Caffe's Reset: serve ``data``/``labels`` (N rows, N a multiple of batch_size) from row 0."""
        n = data.shape[0]
        if n == 0 or n % self.batch_size:
            raise self.error(f"first dimensions of input arrays must be a multiple of batch size "
                             f"{self.batch_size}, got {n}")
        if self.layer_param.HasField("transform_param"):
            log.warning("%s does not transform array data on Reset()", self.type)
        self._arrays = (data, labels)  # kept alive while the tops may view them
        self._data = torch.from_numpy(data).to(self.device, self.dtype).reshape(
            n, self.channels, self.height, self.width)
        self._labels = torch.from_numpy(labels).to(self.device, self.dtype).reshape(n, 1, 1, 1)
        self._pos = 0

    def reshape(self, bottom, top):
        pass  # forward shapes the tops

    def forward(self, bottom, top):
        if self._data is None:
            raise self.error("MemoryDataLayer needs to be initialized by calling Reset "
                             "(net.set_input_arrays(data, labels))")
        b, s = self.batch_size, self._pos
        top[0].reshape((b, self.channels, self.height, self.width))
        top[0].set_data_memory(self._data[s:s + b])
        top[1].reshape((b, 1, 1, 1))
        top[1].set_data_memory(self._labels[s:s + b])
        self._pos = (s + b) % self._data.shape[0]

"""Python layers (``type: "Python"``): a layer written as a Python class, as in pycaffe.

    layer {
      name: "loss" type: "Python" bottom: "pred" bottom: "target" top: "loss"
      python_param { module: "pyloss" layer: "EuclideanLossLayer" param_str: "..." }
      loss_weight: 1      # Python layers have no default loss weight, as in Caffe
    }

``module`` is imported from ``sys.path`` (so from ``PYTHONPATH``), ``layer`` is a class in it that
subclasses ``caffe.Layer`` and defines::

    setup(self, bottom, top)                      # once, when the net is built
    reshape(self, bottom, top)                    # after setup, then before every forward
    forward(self, bottom, top)
    backward(self, top, propagate_down, bottom)

``bottom``/``top`` are lists of blobs with pycaffe's interface (``.data``/``.diff`` numpy arrays,
``.reshape(*shape)``, ``.shape``, ``.count``, ``.num``, ``.channels``, ``.height``, ``.width``).
Before ``setup`` the object gets ``param_str`` (python_param.param_str) and ``phase``
(caffe.TRAIN or caffe.TEST). ``self.blobs`` holds the layer's learnable parameters: add them with
``self.blobs.add_blob(*shape)``; the net treats them like any layer's params (``lr_mult``, sharing
by name, solvers, ``.caffemodel`` files). A loss top's diff holds its loss weight, as in Caffe.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch

from ..blob import Blob
from ..layer import Layer as _EngineLayer
from ..layer import register
from ..proto import caffe_pb2

__all__ = ["BlobVec", "Layer", "PythonLayer", "PyBlob"]


# ----------------------------------------------------------------- pycaffe's blob interface
class _Count(int):
    """A blob's element count that also works called: pycaffe reads ``blob.count`` as a number,
    recaffe's engine calls ``blob.count(start, end)``."""

    def __new__(cls, shape: tuple[int, ...]):
        n = 1
        for d in shape:
            n *= d
        obj = super().__new__(cls, n)
        obj._shape = shape
        return obj

    def __call__(self, start: int = 0, end: int | None = None) -> int:
        n = 1
        for d in self._shape[start:end]:
            n *= d
        return n


class PyBlob(Blob):
    """A Blob as pycaffe shows it: ``count`` is a number (and still callable)."""

    __slots__ = ()

    @property
    def count(self) -> _Count:  # type: ignore[override]
        return _Count(self.shape)


def _as_pyblobs(blobs: Sequence[Blob]) -> None:
    # Same memory layout (PyBlob adds no slots), so the net's own Blob objects can take the
    # pycaffe interface in place; every engine call still works on them.
    for b in blobs:
        if type(b) is Blob:
            b.__class__ = PyBlob


class BlobVec(list):
    """``self.blobs`` of a Python layer (pycaffe's BlobVec): a list of blobs plus ``add_blob``."""

    def __init__(self, blobs=(), dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(blobs)
        self._dtype = dtype
        self._device = torch.device(device)

    def add_blob(self, *shape: int) -> None:
        """Append a zero-filled blob of this shape (``self.blobs.add_blob(10, 3)``)."""
        if len(shape) == 1 and not isinstance(shape[0], int):
            shape = tuple(shape[0])  # also accept a shape sequence
        self.append(PyBlob(tuple(int(d) for d in shape), self._dtype, self._device))


# ------------------------------------------------------------------- the user's base class
class Layer:
    """pycaffe's ``caffe.Layer``: subclass it and define setup/reshape/forward/backward.

    The constructor receives the layer's ``LayerParameter`` (as Caffe passes it)."""

    def __init__(self, param: caffe_pb2.LayerParameter | None = None):
        self._layer_param = param

    @property
    def blobs(self) -> BlobVec:
        """The learnable parameters (read-only attribute; add with ``add_blob``)."""
        vec = self.__dict__.get("_blobs")
        if vec is None:  # also when a subclass __init__ skipped ours
            vec = self.__dict__["_blobs"] = BlobVec()
        return vec

    @property
    def type(self) -> str:
        return "Python"

    def setup(self, bottom, top) -> None:
        pass

    def reshape(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define reshape(self, bottom, top)")

    def forward(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define forward(self, bottom, top)")

    def backward(self, top, propagate_down, bottom) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} must define backward(self, top, propagate_down, bottom)")


# ------------------------------------------------------------------------ engine adapter
@register("Python")
class PythonLayer(_EngineLayer):
    """Runs a ``caffe.Layer`` subclass inside a net. ``impl`` is the Python object; attributes
    this adapter does not have are read from it (``net.layer_dict['loss'].my_attribute``)."""

    runs_user_code = True  # the user's exceptions keep their type (pycaffe re-raises them as they are)

    def __init__(self, param: caffe_pb2.LayerParameter, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__(param, dtype=dtype, device=device)  # loads blobs given in the prototxt
        cls = self._load_class()
        try:
            impl = cls(param)
        except Exception as e:
            raise self.error(f"constructing {self._where(cls)} failed: {type(e).__name__}: {e}") from e
        # The object's blob list *is* this layer's param list: what the user adds in setup is
        # what the net registers, shares, updates and saves.
        vec = impl.blobs
        vec._dtype, vec._device = dtype, self.device
        vec.extend(self.blobs)
        _as_pyblobs(vec)
        self.blobs = vec
        self.impl = impl

    def _load_class(self) -> type[Layer]:
        pp = self.layer_param.python_param
        if not pp.module:
            raise self.error("python_param.module is empty (the module to import, e.g. \"pyloss\")")
        if not pp.layer:
            raise self.error(f"python_param.layer is empty (the class in module {pp.module!r} to use)")
        try:
            module = importlib.import_module(pp.module)
        except Exception as e:
            raise self.error(f"cannot import module {pp.module!r} (python_param.module; it must be on "
                             f"sys.path / PYTHONPATH): {type(e).__name__}: {e}") from e
        try:
            cls = getattr(module, pp.layer)
        except AttributeError as e:
            raise self.error(f"module {pp.module!r} ({getattr(module, '__file__', '?')}) has no class "
                             f"{pp.layer!r} (python_param.layer): AttributeError: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise self.error(f"{pp.module}.{pp.layer} is not a subclass of caffe.Layer")
        return cls

    def _where(self, cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def _call(self, method: str, *args) -> None:
        try:
            getattr(self.impl, method)(*args)
        except Exception as e:
            # Keep the user's exception type (pycaffe re-raises it as it is) but say where it came from.
            if hasattr(e, "add_note"):
                e.add_note(f"in {method}() of Python layer {self.name!r} ({self._where(type(self.impl))})")
            raise

    def _blob_lists(self, *groups: Sequence[Blob]) -> list[list[Blob]]:
        # Copies of the net's lists (the user may keep or change them without touching the net),
        # with pycaffe's blob interface; params too, since sharing may have put a net blob there.
        _as_pyblobs(self.blobs)
        out = []
        for group in groups:
            _as_pyblobs(group)
            out.append(list(group))
        return out

    # --------------------------------------------------------------- contract
    def layer_setup(self, bottom, top):
        self.impl.param_str = self.layer_param.python_param.param_str
        self.impl.phase = int(self.phase)
        self._call("setup", *self._blob_lists(bottom, top))

    def reshape(self, bottom, top):
        self._call("reshape", *self._blob_lists(bottom, top))

    def forward(self, bottom, top):
        self._call("forward", *self._blob_lists(bottom, top))

    def backward(self, top, propagate_down, bottom):
        top, bottom = self._blob_lists(top, bottom)
        self._call("backward", top, [bool(p) for p in propagate_down], bottom)

    def __getattr__(self, name: str):
        impl = self.__dict__.get("impl")
        if impl is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(impl, name)

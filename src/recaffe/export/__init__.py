"""Export a recaffe Net to ONNX or to a plain PyTorch module (``caffe export``).

``build_graph`` walks the net; ``lowering.LOWERINGS`` maps each Caffe type to explicit
semantics; ``onnx_export`` and ``torch_export`` emit them. See docs/export.md.
"""
from .graph import ExportError, ExportGraph, build_graph
from .onnx_export import export_onnx, to_onnx
from .torch_export import export_torch, load_torch_module, to_torch_source, write_torch
from . import segmentation_ops  # noqa: F401,E402  (registers the segmentation forks' lowerings/emitters)
from . import detection_ops  # noqa: F401,E402  (registers the SSD layers' lowerings and emitters)

__all__ = ["ExportError", "ExportGraph", "build_graph", "export_onnx", "to_onnx", "export_torch",
           "load_torch_module", "to_torch_source", "write_torch"]

from . import rcnn_mobile_ops  # noqa: F401  (registers the R-CNN / mobile / YOLO fork types)

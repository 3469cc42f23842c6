"""Data layers: Input (blobs fed from Python), and layers that read data into the net."""
from __future__ import annotations

from ..layer import Layer, register


@register("Input")
class InputLayer(Layer):
    """Tops with fixed shapes (``input_param.shape``) whose data the user writes from Python."""

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        shapes = self.layer_param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"input_param must give 0, 1 or {len(top)} shapes, got {len(shapes)}")
        for i, t in enumerate(top):
            if len(shapes):
                t.reshape(tuple(shapes[0 if len(shapes) == 1 else i].dim))

    def reshape(self, bottom, top):
        pass  # shapes change only when the user reshapes the blobs

    def forward(self, bottom, top):
        pass

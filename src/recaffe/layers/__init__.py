"""Built-in layer types, one family per module; importing this package registers them all."""
from . import (common, data, hdf5_data, image_data, loss, memory_data, neuron, normalization,  # noqa: F401
               python_layer, recurrent, roi, vision, yolo)

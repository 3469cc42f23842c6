"""Built-in layer types, one family per module; importing this package registers them all."""
from . import (common, data, detection_evaluate, hdf5_data, image_data, loss, memory_data, multibox,  # noqa: F401
               neuron, normalization, python_layer, recurrent, vision)

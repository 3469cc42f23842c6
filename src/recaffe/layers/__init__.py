"""Built-in layer types, one family per module; importing this package registers them all."""
from . import (annotated_data, common, data, detection, detection_evaluate, hdf5_data, image_data,  # noqa: F401
               loss, mat_files, memory_data, multibox, neuron, normalization, python_layer, recurrent, roi,
               vision, yolo)

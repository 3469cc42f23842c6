"""Built-in layer types, one family per module; importing this package registers them all."""
from . import (common, data, hdf5_data, image_data, loss, mat_files, memory_data, neuron,  # noqa: F401
               normalization, python_layer, recurrent, vision)

"""Built-in layer types, one family per module; importing this package registers them all."""
from . import common, data, loss, neuron, normalization, python_layer, recurrent, vision  # noqa: F401

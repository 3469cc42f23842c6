"""pycaffe's ``caffe.Classifier``: a Net that classifies images, whole, centre-cropped or
averaged over ten crops (corners, centre and their mirrors)."""
from __future__ import annotations

import numpy as np

from . import TEST, Net
from . import io as caffe_io


def input_transformer(net, mean, input_scale, raw_scale, channel_swap) -> caffe_io.Transformer:
    """The Transformer pycaffe's Classifier and Detector set up for the net's first input:
    transpose (2, 0, 1) and whichever of the options are given."""
    in_ = net.inputs[0]
    transformer = caffe_io.Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None)``: a TEST-phase net with a Transformer for its first input.

    Images are resized to ``image_dims`` (default: the input blob's H x W), cropped to the input
    blob's H x W and preprocessed (transpose (2, 0, 1), then channel swap, raw scale, mean, input
    scale as in ``caffe.io.Transformer``).
    """

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        in_ = self.inputs[0]
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """Class scores of the first output for a list of (H, W, K) images.

        Each image is resized to ``image_dims``; with ``oversample`` the ten crops' predictions
        are averaged into one (N, C) row per image, else the centre crop's prediction is returned.
        """
        h, w = (int(d) for d in self.image_dims)
        input_ = np.zeros((len(inputs), h, w, inputs[0].shape[2]), dtype=np.float32)
        for ix, in_ in enumerate(inputs):
            input_[ix] = caffe_io.resize_image(in_, (h, w))

        if oversample:
            input_ = caffe_io.oversample(input_, self.crop_dims)
        else:
            # Centre crop; the corners are truncated to ints as pycaffe does.
            top, left = (np.array((h, w)) / 2.0 - self.crop_dims / 2.0).astype(int)
            ch, cw = self.crop_dims
            input_ = input_[:, top:top + ch, left:left + cw, :]

        in_name = self.inputs[0]
        caffe_in = np.zeros(np.array(input_.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, crop in enumerate(input_):
            caffe_in[ix] = self.transformer.preprocess(in_name, crop)
        predictions = self.forward_all(**{in_name: caffe_in})[self.outputs[0]]

        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions

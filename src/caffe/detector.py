"""pycaffe's ``caffe.Detector``: classify windows of images (R-CNN style), each warped to the
net's input size, optionally with surrounding context.

Windows are (ymin, xmin, ymax, xmax) pixel coordinates; the crop is ``image[ymin:ymax, xmin:xmax]``.
"""
from __future__ import annotations

import os

import numpy as np

from . import TEST, Net
from . import io as caffe_io
from .classifier import input_transformer


class Detector(Net):
    """``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``: a TEST-phase net with a Transformer for its first
    input (transpose (2, 0, 1) plus the given options). ``context_pad``: as in R-CNN, that many
    pixels of the net's (square) input border show context around the window.
    """

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = input_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows) -> list[dict]:
        """Predictions for every window of every image.

        ``images_windows``: iterable of (image filename, list of windows). Returns one dict per
        window, in order: ``{'window': window, 'prediction': first output row, 'filename': name}``.
        """
        images_windows = [(fname, list(windows)) for fname, windows in images_windows]
        window_inputs = []
        for image_fname, windows in images_windows:
            image = caffe_io.load_image(image_fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, window))
        if not window_inputs:
            return []

        in_ = self.inputs[0]
        in_hw = tuple(self.blobs[in_].data.shape[2:])
        caffe_in = np.zeros((len(window_inputs), window_inputs[0].shape[2]) + in_hw, dtype=np.float32)
        for ix, window_in in enumerate(window_inputs):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)  # warps to the input size
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]

        detections = []
        ix = 0
        for image_fname, windows in images_windows:
            for window in windows:
                detections.append({'window': window, 'prediction': predictions[ix], 'filename': image_fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames) -> list[dict]:
        """``detect_windows`` over Selective Search proposals, from the external
        ``selective_search_ijcv_with_python`` module, which runs MATLAB
        (https://github.com/sergeyk/selective_search_ijcv_with_python)."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError as e:
            raise ImportError(
                "Detector.detect_selective_search needs the selective_search_ijcv_with_python module "
                "(https://github.com/sergeyk/selective_search_ijcv_with_python) on the Python path; "
                f"it could not be imported: {e}") from e
        image_fnames = [os.path.abspath(f) for f in image_fnames]  # absolute: MATLAB runs elsewhere
        windows_list = selective_search.get_windows(image_fnames, cmd='selective_search_rcnn')
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im, window) -> np.ndarray:
        """The window of an (H, W, K) image; with ``context_pad``, R-CNN's crop with context.

        With context, the window is enlarged about its centre so that, once warped to the
        (square) input size, ``context_pad`` pixels on each side show its surroundings; parts
        falling outside the image are filled with the mean (in image space) and the rest is
        resized into place. Rounding is numpy's / Python 3's (half to even) throughout; pycaffe
        under Python 2 rounded the pad and size half away from zero.
        """
        window = [int(v) for v in window]
        crop = im[window[0]:window[2], window[1]:window[3]]
        if not self.context_pad:
            return crop

        box = np.array(window, dtype=np.float64)
        crop_size = self.blobs[self.inputs[0]].width  # assumes a square input
        scale = crop_size / (1. * crop_size - self.context_pad * 2)
        # The window + context, about the same centre (sizes count both end pixels, as R-CNN).
        half_h = (box[2] - box[0] + 1) / 2.
        half_w = (box[3] - box[1] + 1) / 2.
        center = (box[0] + half_h, box[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = int(round(max(0, -box[0]) * scale_h))  # input pixels that lie out of the image
        pad_x = int(round(max(0, -box[1]) * scale_w))

        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0., [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise ValueError(f"window {window} lies outside the image of size {im_h}x{im_w}")
        crop_h = int(round(clip_h * scale_h))
        crop_w = int(round(clip_w * scale_w))
        crop_h = min(crop_h, crop_size - pad_y)
        crop_w = min(crop_w, crop_size - pad_x)

        y0, x0, y1, x1 = box.astype(int)
        context_crop = caffe_io.resize_image(im[y0:y1, x0:x1], (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context_crop
        return crop

    def configure_crop(self, context_pad) -> None:
        """Set ``crop_dims`` (the input blob's shape in image layout, H x W x K), ``context_pad``
        and, with context, ``crop_mean``: the mean taken back to image space (transpose and
        channel swap undone, divided by raw_scale) to fill the context outside the image."""
        in_ = self.inputs[0]
        inv_tpose = np.argsort(self.transformer.transpose[in_])
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if not self.context_pad:
            return
        channel_order = self.transformer.channel_swap.get(in_)
        raw_scale = self.transformer.raw_scale.get(in_)
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        mean = np.array(mean, dtype=np.float64)
        if mean.ndim == 2:  # an (H, W) mean holds one channel
            mean = mean[np.newaxis]
        crop_mean = mean.transpose(inv_tpose)
        if channel_order is not None:
            crop_mean = crop_mean[:, :, np.argsort(channel_order)]
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean

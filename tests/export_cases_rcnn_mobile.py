"""Export cases of the Faster R-CNN / R-FCN and mobile / YOLO fork types, added to
test_export.CASES (one family, run through onnxruntime and the generated torch module)."""
import numpy as np

FILL = ('weight_filler { type: "gaussian" std: 0.3 } '
        'bias_filler { type: "gaussian" std: 0.3 }')


def _normal(shape):
    return np.random.default_rng(11).standard_normal(shape)


def _spread(shape):
    return np.random.default_rng(12).standard_normal(shape) * 5  # many values beyond 0 and 6


def _rois(shape):
    """ROIs on a 2-image batch in pixels: integer corners (times 0.5 many end in .5: C's round
    goes up, numpy's to even), a malformed one, some partly outside the map."""
    rng = np.random.default_rng(13)
    r = shape[0]
    x1, y1 = rng.integers(-4, 12, r), rng.integers(-4, 12, r)
    x2, y2 = x1 + rng.integers(-2, 12, r), y1 + rng.integers(-2, 12, r)
    return np.stack([rng.integers(0, 2, r), x1, y1, x2, y2], 1).astype(float)


def _fractional_rois(shape):
    rois = _rois(shape)
    rois[:, 1:] += np.random.default_rng(14).choice([0.0, 0.25, 0.5, 0.75], (shape[0], 4))
    return rois


def cases(Case, L):
    """The cases, built with test_export's Case and L."""
    return {
        "relu6": Case(L("ReLU6") + L("ReLU6", "relu_param { negative_slope: 0.1 }", top=("z",)),
                      feed=(_spread,)),
        "shuffle_channel": Case(L("ShuffleChannel", "shuffle_channel_param { group: 3 }"), ((2, 6, 3, 2),)),
        "depthwise": Case(L("ConvolutionDepthwise", "convolution_param { num_output: 4 kernel_size: 3 pad: 1 "
                                                    f"stride: 2 {FILL} }}")
                          + L("DepthwiseConvolution", "convolution_param { num_output: 8 kernel_size: 2 "
                                                      f"{FILL} }}", top=("z",)), ((2, 4, 7, 6),)),
        "axpy": Case(L("Axpy", bottom=("x0", "x1", "x2")), ((2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 4, 5))),
        "reorg": Case(L("Reorg", "reorg_param { stride: 2 }")
                      + L("Reorg", "reorg_param { stride: 2 reverse: true }", bottom=("x1",), top=("z",)),
                      ((2, 8, 4, 6), (2, 8, 3, 2))),
        "region": Case(L("Region", "region_param { classes: 3 boxes_of_each_grid: 2 softmax: true }")
                       + L("Region", "region_param { classes: 3 boxes_of_each_grid: 2 }", top=("z",)),
                       ((2, 16, 3, 4),)),
        "roi_pooling": Case(L("ROIPooling", "roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.5 }",
                              bottom=("x0", "x1")), ((2, 3, 9, 8), (12, 5)), (_normal, _rois)),
        "psroi_pooling": Case(L("PSROIPooling", "psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 "
                                                "group_size: 3 }", bottom=("x0", "x1")),
                              ((2, 18, 6, 7), (12, 5)), (_normal, _fractional_rois)),
        "dropout_scale_train_false": Case(L("Dropout", "dropout_param { dropout_ratio: 0.3 scale_train: false }")
                                          + L("Dropout", "dropout_param { dropout_ratio: 0.5 scale_train: false }",
                                              bottom=("y",), top=("y",), name="inplace")),
    }

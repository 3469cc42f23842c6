"""pycaffe's ``caffe.layer_type_list()`` names every layer type BVLC Caffe registers."""
import caffe

# The types BVLC/caffe (master) registers: REGISTER_LAYER_CLASS in src/caffe/layers/*.cpp and
# REGISTER_LAYER_CREATOR in src/caffe/layer_factory.cpp (Convolution, Deconvolution, Pooling, LRN,
# ReLU, Sigmoid, Softmax, TanH, Python), written out here by hand.
CAFFE_LAYER_TYPES = (
    "AbsVal", "Accuracy", "ArgMax", "BatchNorm", "BatchReindex", "Bias", "BNLL", "Clip", "Concat",
    "ContrastiveLoss", "Convolution", "Crop", "Data", "Deconvolution", "Dropout", "DummyData", "Eltwise",
    "ELU", "Embed", "EuclideanLoss", "Exp", "Filter", "Flatten", "HDF5Data", "HDF5Output", "HingeLoss",
    "Im2col", "ImageData", "InfogainLoss", "InnerProduct", "Input", "Log", "LRN", "LSTM", "LSTMUnit",
    "MemoryData", "MultinomialLogisticLoss", "MVN", "Parameter", "Pooling", "Power", "PReLU", "Python",
    "Reduction", "ReLU", "Reshape", "RNN", "Scale", "Sigmoid", "SigmoidCrossEntropyLoss", "Silence",
    "Slice", "Softmax", "SoftmaxWithLoss", "Split", "SPP", "Swish", "TanH", "Threshold", "Tile",
    "WindowData",
)


def test_the_list_is_caffes_61():
    assert len(CAFFE_LAYER_TYPES) == len(set(CAFFE_LAYER_TYPES)) == 61


def test_layer_type_list_has_every_caffe_type():
    registered = caffe.layer_type_list()
    missing = sorted(set(CAFFE_LAYER_TYPES) - set(registered))
    assert not missing, f"Caffe layer types recaffe does not register: {missing}"


def test_layer_type_list_is_sorted_and_unique():
    registered = caffe.layer_type_list()
    assert registered == sorted(set(registered))

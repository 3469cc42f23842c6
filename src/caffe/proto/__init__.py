"""``caffe.proto.caffe_pb2`` as in pycaffe: the same module object as ``recaffe.proto.caffe_pb2``."""
import sys

from recaffe.proto import caffe_pb2

sys.modules[__name__ + ".caffe_pb2"] = caffe_pb2
__all__ = ["caffe_pb2"]

"""Caffe's protobuf schema: ``caffe_pb2`` is generated from ``caffe.proto`` by tools/gen_caffe_pb2.py."""
from . import caffe_pb2

__all__ = ["caffe_pb2"]

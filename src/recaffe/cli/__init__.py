"""The caffe/recaffe command line and Caffe's tools."""

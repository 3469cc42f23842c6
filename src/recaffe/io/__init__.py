"""Reading and writing Caffe's files: prototxt text, binary protos, weights, with clear errors."""

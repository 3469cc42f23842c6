"""Data input: key-value databases of Datums (LMDB, LevelDB), Caffe's DataTransformer, background
prefetching, and the MNIST IDX converter."""

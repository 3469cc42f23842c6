#!/usr/bin/env bash
# Convert the bundled MNIST sample (IDX files in examples/mnist/data/) to LMDBs of Datums.
# Run from the repository root: ./examples/mnist/create_mnist.sh
set -euo pipefail
EXAMPLE=examples/mnist
DATA=$EXAMPLE/data
BACKEND=${BACKEND:-lmdb}

echo "Creating ${BACKEND}..."
rm -rf $EXAMPLE/mnist_train_${BACKEND} $EXAMPLE/mnist_test_${BACKEND}
caffe convert_mnist_data $DATA/train-images-idx3-ubyte.gz $DATA/train-labels-idx1-ubyte.gz \
  $EXAMPLE/mnist_train_${BACKEND} --backend=${BACKEND}
caffe convert_mnist_data $DATA/t10k-images-idx3-ubyte.gz $DATA/t10k-labels-idx1-ubyte.gz \
  $EXAMPLE/mnist_test_${BACKEND} --backend=${BACKEND}
echo "Done."

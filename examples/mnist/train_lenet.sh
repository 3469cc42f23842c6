#!/usr/bin/env bash
# Train LeNet on the bundled MNIST sample. Run from the repository root: ./examples/mnist/train_lenet.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -d examples/mnist/mnist_train_lmdb ] || [ ! -d examples/mnist/mnist_test_lmdb ]; then
  ./examples/mnist/create_mnist.sh
fi
caffe train --solver=examples/mnist/lenet_solver.prototxt "$@"

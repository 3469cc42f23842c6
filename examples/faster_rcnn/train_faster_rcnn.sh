#!/usr/bin/env bash
# Train the small Faster R-CNN on synthetic shapes (about a minute on a CPU). From the repository root:
#     ./examples/faster_rcnn/train_faster_rcnn.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHONPATH="examples/faster_rcnn${PYTHONPATH:+:$PYTHONPATH}" caffe train --solver=examples/faster_rcnn/solver.prototxt "$@"

#!/usr/bin/env bash
# Train the small SSD on synthetic shapes, as the SSD fork's pipeline does: make the data set,
# convert it with convert_annoset, train with detection_eval tests. Run from the repository root:
#     ./examples/ssd/train_ssd_shapes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
D=examples/ssd/shapes
if [ ! -d examples/ssd/shapes_trainval_lmdb ]; then
  python examples/ssd/make_shapes.py "$D" --train 300 --test 60
  for split in trainval test; do
    caffe convert_annoset --anno_type=detection --label_type=xml --label_map_file="$D/labelmap.prototxt" \
      --encoded --encode_type=png "$D/" "$D/$split.txt" "examples/ssd/shapes_${split}_lmdb"
  done
fi
python examples/ssd/make_nets.py
caffe train --solver=examples/ssd/ssd_shapes_solver.prototxt "$@"

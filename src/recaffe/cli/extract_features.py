"""extract_features: run a trained net and store the features of some of its blobs in LMDB or
LevelDB databases, as Caffe's tool (the extraction is :func:`recaffe.data.features.extract_features`).

Usage: extract_features pretrained_net_param feature_extraction_proto_file
       extract_feature_blob_name1[,name2,...] save_feature_dataset_name1[,name2,...]
       num_mini_batches db_type [CPU/GPU] [DEVICE_ID=0]
"""
from __future__ import annotations

import sys

USAGE = """\
This program takes in a trained network and an input data layer, and then extract features of the \
input data produced by the net.
Usage: extract_features  pretrained_net_param  feature_extraction_proto_file  \
extract_feature_blob_name1[,name2,...]  save_feature_dataset_name1[,name2,...]  num_mini_batches  \
db_type  [CPU/GPU] [DEVICE_ID=0]
Note: you can extract multiple features in one pass by specifying multiple feature blob names and \
dataset names separated by ','. The names cannot contain white space characters and the number of \
blobs and datasets must be equal.
"""


def main(argv: list[str] | None = None) -> int:
    from .. import device
    from ..data.db import DBError
    from ..data.features import extract_features
    from ..log import get_logger
    from ..net import Net
    from ..proto import caffe_pb2

    log = get_logger("extract_features")
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "-help", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    if len(argv) < 6 or len(argv) > 8:
        print(f"extract_features: expected 6 to 8 arguments, got {len(argv)}\n\n{USAGE}", end="",
              file=sys.stderr)
        return 1
    weights, proto, blobs, datasets, batches, db_type = argv[:6]
    try:
        num_mini_batches = int(batches)
    except ValueError:
        print(f"extract_features: num_mini_batches must be an integer, got {batches!r}", file=sys.stderr)
        return 1
    was_gpu = device.mode() == "gpu"
    try:
        if len(argv) > 6 and argv[6] == "GPU":
            device_id = int(argv[7]) if len(argv) > 7 else 0
            if device_id < 0:
                raise ValueError(f"DEVICE_ID must be >= 0, got {device_id}")
            log.info("Using GPU")
            log.info("Using Device_id=%d", device_id)
            device.set_mode_gpu()
            device.set_device(device_id)
        else:
            log.info("Using CPU")
            device.set_mode_cpu()
        net = Net(proto, caffe_pb2.TEST)
        net.copy_from(weights)
        extract_features(net, blobs.split(","), datasets.split(","), num_mini_batches, db_type,
                         source=proto)
    except (ValueError, DBError, device.DeviceError, OSError) as e:
        print(f"extract_features: {e}", file=sys.stderr)
        return 1
    finally:
        (device.set_mode_gpu if was_gpu else device.set_mode_cpu)()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate src/recaffe/proto/caffe_pb2.py from src/recaffe/proto/caffe.proto.

usage: python tools/gen_caffe_pb2.py      (needs grpcio-tools: pip install -e .[dev])
The generated module is committed so that users need only the protobuf runtime.
"""
import pathlib
import sys

from grpc_tools import protoc

proto_dir = pathlib.Path(__file__).resolve().parent.parent / "src" / "recaffe" / "proto"
rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={proto_dir}", str(proto_dir / "caffe.proto")])
if rc != 0:
    sys.exit(f"protoc failed with exit code {rc}")
print(f"wrote {proto_dir / 'caffe_pb2.py'}")

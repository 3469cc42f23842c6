"""Small builders shared by the tests: nets from prototxt text, and a log capture."""
import contextlib
import logging
import os
import tempfile

from recaffe.io.protofiles import parse_text
from recaffe.net import Net
from recaffe.proto import caffe_pb2


def net_param(text: str) -> caffe_pb2.NetParameter:
    return parse_text(text, caffe_pb2.NetParameter(), filename="<test net>")


def make_net(text: str, phase=caffe_pb2.TRAIN, **kw) -> Net:
    return Net(net_param(text), phase, **kw)


def write(tmp_path, name: str, text: str) -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    return path


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def capture_log():
    """Collect recaffe's log messages (without glog prefixes) during the block."""
    logger = logging.getLogger("recaffe")
    handler = LogCapture()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def tmpfile(suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    return path

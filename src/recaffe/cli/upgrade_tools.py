"""Caffe's upgrade tools: rewrite old nets, weights and solvers in the current format.

    upgrade_net_proto_text v0_net_proto_file_in net_proto_file_out
    upgrade_net_proto_binary v0_net_proto_file_in net_proto_file_out
    upgrade_solver_proto_text old_solver_proto_file_in solver_proto_file_out

As Caffe's tools: exit 1 on a usage error, 2 when the input cannot be parsed, 1 when the upgrade
had problems (the file is still written), 0 otherwise; a file already current is copied with a
logged note. The binary tool applies every net upgrade (Caffe 1.0's UpgradeNetAsNeeded).
Outputs are written atomically; text outputs list fields in the order caffe.proto declares them
(Caffe's own writer orders them by field number), which reads like the hand-written prototxts.
"""
from __future__ import annotations

import sys

from google.protobuf import text_format

from ..io.large_proto import read_binary_any_size
from ..io.protofiles import ProtoFileError, atomic_write, read_text
from ..io.upgrade import (UpgradeError, net_needs_upgrade, solver_needs_upgrade, upgrade_net_as_needed,
                          upgrade_solver)
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)


def _text(msg) -> bytes:
    return text_format.MessageToString(msg, use_index_order=True).encode("utf-8")


def _run(tool: str, argv: list[str] | None, usage: str, kind: str, binary: bool) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2:
        log.error("Usage: %s %s", tool, usage)
        print(f"Usage: {tool} {usage}", file=sys.stderr)
        return 1
    source, target = argv
    is_net = kind == "NetParameter"
    msg = caffe_pb2.NetParameter() if is_net else caffe_pb2.SolverParameter()
    try:
        if binary:
            read_binary_any_size(source, msg, kind)
        else:
            read_text(source, msg)
    except ProtoFileError as e:
        log.error("Failed to parse input %s file as %s: %s", "binary" if binary else "text", kind, source)
        print(f"{tool}: {e}", file=sys.stderr)
        return 2
    success = True
    try:
        if is_net and net_needs_upgrade(msg):
            success = upgrade_net_as_needed(msg, source)
        elif not is_net and solver_needs_upgrade(msg):
            upgrade_solver(msg, source)
        else:
            log.error("File already in latest proto format: %s", source)
    except UpgradeError as e:
        log.error("%s", e)
        print(f"{tool}: {e}", file=sys.stderr)
        return 1
    if not success:
        log.error("Encountered error(s) while upgrading %s; see details above.", source)
    atomic_write(target, msg.SerializeToString() if binary else _text(msg))
    log.info("Wrote upgraded %s %s proto to %s", kind, "binary" if binary else "text", target)
    return 0 if success else 1


def main_upgrade_net_proto_text(argv: list[str] | None = None) -> int:
    return _run("upgrade_net_proto_text", argv, "v0_net_proto_file_in net_proto_file_out", "NetParameter",
                binary=False)


def main_upgrade_net_proto_binary(argv: list[str] | None = None) -> int:
    return _run("upgrade_net_proto_binary", argv, "v0_net_proto_file_in net_proto_file_out", "NetParameter",
                binary=True)


def main_upgrade_solver_proto_text(argv: list[str] | None = None) -> int:
    return _run("upgrade_solver_proto_text", argv, "old_solver_proto_file_in solver_proto_file_out",
                "SolverParameter", binary=False)


main = main_upgrade_net_proto_text  # the module's default tool

"""Fuzzing the readers (tests/fuzzing.py): success or a clean recaffe error, nothing else.

CI runs ``RECAFFE_FUZZ_N`` inputs per reader (default 60: about 15 s in all); the long mode is
the same test with a bigger N (``RECAFFE_FUZZ_N=20000``) or ``python tests/fuzzing.py --n ...``.
Seeded: a failure names the index that reproduces it (``--reproduce INDEX --targets NAME``).
"""
import os

import pytest
from fuzzing import TARGETS, fuzz

N = int(os.environ.get("RECAFFE_FUZZ_N", "60"))
SEED = int(os.environ.get("RECAFFE_FUZZ_SEED", "0"))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_gives_success_or_a_clean_error(target):
    done, _, failures, _ = fuzz(target, N, SEED)
    assert done == N
    assert not failures, "\n".join(str(f) for f in failures[:10])


def test_the_fuzzer_reports_what_is_not_a_recaffe_error(monkeypatch):
    """The rule can fail: a raw exception from a reader is reported with its index."""
    import fuzzing

    def broken(self, r):
        raise KeyError("raw")
    monkeypatch.setattr(fuzzing.PrototxtTarget, "run", broken)
    done, clean, failures, _ = fuzz("prototxt", 3, 0)
    assert done == 3 and clean == 0
    assert [f.index for f in failures] == [0, 1, 2] and failures[0].kind == "KeyError"


def test_mutations_are_seeded():
    import random

    import fuzzing
    a = fuzzing.mutate_text(fuzzing.NET_SEEDS[0], random.Random("x/1"))
    b = fuzzing.mutate_text(fuzzing.NET_SEEDS[0], random.Random("x/1"))
    assert a == b != fuzzing.NET_SEEDS[0]


def test_the_seeds_themselves_run():
    """Mutations start from valid inputs: every seed net and solver runs without error."""
    import fuzzing
    from recaffe.io.protofiles import parse_text
    from recaffe.proto import caffe_pb2
    from recaffe.solvers import create_solver
    with fuzzing.bounded():
        for seed in fuzzing.NET_SEEDS:
            for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
                net = fuzzing._net_text(seed.decode(), phase)
                net.forward()
                net.backward()
        for seed in fuzzing.SOLVER_SEEDS:
            param = parse_text((seed % fuzzing._LOSS_NET).decode(), caffe_pb2.SolverParameter())
            create_solver(param).step(2)

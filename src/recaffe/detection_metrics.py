"""The SSD fork's detection test mode: mean average precision over DetectionEvaluate's rows.

A solver with ``eval_type: "detection"`` runs each test net for ``test_iter`` batches and, for every
net output (DetectionEvaluate's ``[1, 1, n, 5]`` rows), collects per label the number of ground-truth
boxes (rows ``[-1, label, num_pos, -1, -1]``) and the ``(score, tp)``/``(score, fp)`` pairs of the
detections (rows with tp = fp = 0, detections of difficult boxes not evaluated, are skipped). The
average precision of each label follows ``ap_version`` (``11point``: VOC2007; ``MaxIntegral``:
VOC2012/ILSVRC; ``Integral``: the plain area), and the logged value is their mean over the labels
that have ground truth, as the fork prints it:
``Test net output #0: detection_eval = 0.71`` (so that log parsers and plots keep working).
"""
from __future__ import annotations

import numpy as np

from .log import get_logger

log = get_logger(__name__)

AP_VERSIONS = ("11point", "MaxIntegral", "Integral")


def average_precision(scores_tp: list[tuple[float, int]], scores_fp: list[tuple[float, int]],
                      num_pos: int, version: str) -> float:
    """The fork's ComputeAP for one label (float32 arithmetic as the fork)."""
    if version not in AP_VERSIONS:
        raise ValueError(f"Unknown ap_version {version!r} (one of {', '.join(AP_VERSIONS)})")
    if len(scores_tp) != len(scores_fp):
        raise ValueError("true and false positive lists differ in length")
    if not scores_tp or num_pos == 0:
        return 0.0
    eps = np.float32(1e-6)

    def cumsum(pairs):
        order = sorted(range(len(pairs)), key=lambda i: -pairs[i][0])  # stable, descending scores
        return np.cumsum([pairs[i][1] for i in order])

    tp, fp = cumsum(scores_tp), cumsum(scores_fp)
    prec = (tp / (tp + fp)).astype(np.float32)
    rec = (tp / np.float32(num_pos)).astype(np.float32)
    num = len(prec)
    ap = np.float32(0)
    if version == "11point":
        max_precs = np.zeros(11, dtype=np.float32)
        start = num - 1
        for j in range(10, -1, -1):
            for i in range(start, -1, -1):
                if rec[i] < j / 10.0:
                    start = i
                    if j > 0:
                        max_precs[j - 1] = max_precs[j]
                    break
                if max_precs[j] < prec[i]:
                    max_precs[j] = prec[i]
        for j in range(10, -1, -1):
            ap += max_precs[j] / np.float32(11)
    elif version == "MaxIntegral":
        cur_rec, cur_prec = rec[-1], prec[-1]
        for i in range(num - 2, -1, -1):
            cur_prec = max(prec[i], cur_prec)
            if abs(cur_rec - rec[i]) > eps:
                ap += cur_prec * abs(cur_rec - rec[i])
            cur_rec = rec[i]
        ap += cur_rec * cur_prec
    else:
        prev = np.float32(0)
        for i in range(num):
            if abs(rec[i] - prev) > eps:
                ap += prec[i] * abs(rec[i] - prev)
            prev = rec[i]
    return float(ap)


class DetectionTally:
    """True/false positives and ground-truth counts per label, gathered over test batches."""

    def __init__(self):
        self.tp: dict[int, list[tuple[float, int]]] = {}
        self.fp: dict[int, list[tuple[float, int]]] = {}
        self.num_pos: dict[int, int] = {}

    def add(self, rows: np.ndarray, where: str = "the test net output") -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim == 0 or rows.shape[-1] != 5:
            raise ValueError(f"{where} must have 5 values per row (DetectionEvaluate's output), got "
                             f"shape {rows.shape}")
        for item, label, score, tp, fp in rows.reshape(-1, 5):
            label = int(label)
            if int(item) == -1:
                self.num_pos[label] = self.num_pos.get(label, 0) + int(score)
            elif int(tp) or int(fp):
                self.tp.setdefault(label, []).append((float(np.float32(score)), int(tp)))
                self.fp.setdefault(label, []).append((float(np.float32(score)), int(fp)))

    def mean_ap(self, version: str, per_class: bool = False) -> float:
        """The fork's mAP: the mean over the labels with a ground-truth count row."""
        total = np.float32(0)
        for label, n in sorted(self.num_pos.items()):
            if label not in self.tp:
                log.warning("Missing true_pos for label: %d", label)
                continue
            ap = average_precision(self.tp[label], self.fp[label], n, version)
            total += np.float32(ap)
            if per_class:
                log.info("class%d: %g", label, ap)
        return float(total / np.float32(len(self.num_pos))) if self.num_pos else 0.0


def run_detection_test(solver, test_net_id: int) -> dict[str, float]:
    """The fork's Solver::TestDetection: returns {output name: mAP} (empty when interrupted)."""
    p = solver.param
    net = solver.test_nets[test_net_id]
    log.info("Iteration %d, Testing net (#%d)", solver.iter, test_net_id)
    net.share_with(solver.net)
    tallies = [DetectionTally() for _ in net.outputs]
    total_loss = 0.0
    iters = p.test_iter[test_net_id]
    for _ in range(iters):
        if solver.action_request and solver.action_request() == "stop":
            solver.requested_early_exit = True
            log.info("Test interrupted.")
            return {}
        total_loss += net.forward_loss()
        for name, tally in zip(net.outputs, tallies):
            try:
                tally.add(net.blobs[name].data, f"test net output {name!r}")
            except ValueError as e:
                from .solvers.solver import SolverError
                raise SolverError(f"eval_type \"detection\": {e}; every output of a detection test net "
                                  "must be a DetectionEvaluate top") from None
    if p.test_compute_loss:
        log.info("Test loss: %g", total_loss / iters)
    out = {}
    for i, (name, tally) in enumerate(zip(net.outputs, tallies)):
        out[name] = tally.mean_ap(p.ap_version, p.show_per_class_result)
        log.info("    Test net output #%d: %s = %g", i, name, out[name])
    return out

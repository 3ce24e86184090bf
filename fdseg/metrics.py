"""Metrics exactly as the paper's code computes them.

One confusion matrix per dataset over ``n_classes + 1`` labels (0 = background),
accumulated over all episodes of the dataset; in an episode of class ``c`` the
ground-truth defect pixels are labelled ``c`` and so are the predicted ones.

* IoU of a label = diag / (row + column - diag)
* mIoU = mean IoU over the foreground classes
* FB-IoU = (mIoU + background IoU) / 2
* precision / recall per class = TP / (TP + FP), TP / (TP + FN), averaged over classes
* benchmark mean = mean IoU over every class of every dataset

Defect-free queries do not enter the matrix; their predicted pixels give the
false-positive pixel rate, reported apart.

Image level (episodes that carry a ``defect_score`` and ``is_defective``): ``auroc`` of the defect
score, defective queries against defect-free ones, and ``ok_flagged``, the share of defect-free
queries whose verdict is defective (the false-alarm rate).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def episode_counts(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) pixel counts of boolean masks of the same shape."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    tp = int(np.count_nonzero(gt & pred))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(gt)) - tp
    return tp, fp, fn, int(gt.size) - tp - fp - fn


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (True = positive): the probability
    that a random positive scores above a random negative, ties counting one half (Mann-Whitney U).
    None when either class is missing."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores and {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ss = s[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    ends = np.r_[starts[1:], len(ss)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


class ConfusionMatrix:
    """``cm[g, p]`` = pixels of ground-truth label g predicted as p."""

    def __init__(self, n_labels: int):
        self.n = n_labels
        self.cm = np.zeros((n_labels, n_labels), dtype=np.int64)

    def update(self, gt_labels: np.ndarray, pred_labels: np.ndarray) -> None:
        g, p = np.asarray(gt_labels).ravel().astype(np.int64), np.asarray(pred_labels).ravel().astype(np.int64)
        if g.shape != p.shape:
            raise ValueError("label maps differ in size")
        self.cm += np.bincount(g * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def add_episode(self, label: int, tp: int, fp: int, fn: int, tn: int) -> None:
        """Add one binary episode of class ``label`` (1..n-1)."""
        self.cm[label, label] += tp
        self.cm[0, label] += fp
        self.cm[label, 0] += fn
        self.cm[0, 0] += tn

    def iou(self) -> np.ndarray:
        d = np.diag(self.cm).astype(np.float64)
        union = self.cm.sum(0) + self.cm.sum(1) - d
        return np.divide(d, union, out=np.zeros_like(d), where=union > 0)

    def precision(self) -> np.ndarray:
        d = np.diag(self.cm).astype(np.float64)
        col = self.cm.sum(0).astype(np.float64)
        return np.divide(d, col, out=np.zeros_like(d), where=col > 0)

    def recall(self) -> np.ndarray:
        d = np.diag(self.cm).astype(np.float64)
        row = self.cm.sum(1).astype(np.float64)
        return np.divide(d, row, out=np.zeros_like(d), where=row > 0)

    def miou(self) -> float:
        return float(self.iou()[1:].mean())

    def fbiou(self) -> float:
        return float((self.iou()[1:].mean() + self.iou()[0]) / 2)


@dataclass
class DatasetScores:
    dataset: str
    classes: list[str]
    class_iou: dict[str, float]
    miou: float
    fbiou: float
    precision: float
    recall: float
    episodes: int
    fp_rate: float | None = None      # predicted-defect pixel fraction on defect-free queries
    defect_free: int = 0
    auroc: float | None = None        # image level: defect_score, defective vs defect-free queries
    ok_flagged: float | None = None   # image level: share of defect-free queries judged defective
    defect_flagged: float | None = None   # image level: share of defective queries judged defective

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def dataset_scores(dataset: str, classes: list[str], episodes: list[dict]) -> DatasetScores:
    """Scores of one dataset from per-episode counts
    (dicts with ``cls``, ``tp``, ``fp``, ``fn``, ``tn``, ``defect_free``)."""
    classes = sorted(classes)
    label = {c: i + 1 for i, c in enumerate(classes)}
    cm = ConfusionMatrix(len(classes) + 1)
    fp_px = tot_px = n_free = 0
    n = 0
    for e in episodes:
        if e.get("defect_free"):
            n_free += 1
            fp_px += e["fp"]
            tot_px += e["fp"] + e["tn"]
            continue
        cm.add_episode(label[e["cls"]], e["tp"], e["fp"], e["fn"], e["tn"])
        n += 1
    iou = cm.iou()
    img = [e for e in episodes if e.get("defect_score") is not None]
    ok = [bool(e["is_defective"]) for e in img if e.get("defect_free")]
    bad = [bool(e["is_defective"]) for e in img if not e.get("defect_free")]
    return DatasetScores(dataset, classes, {c: float(iou[label[c]]) for c in classes}, cm.miou(), cm.fbiou(),
                         float(cm.precision()[1:].mean()), float(cm.recall()[1:].mean()), n,
                         (fp_px / tot_px) if tot_px else None, n_free,
                         auroc([e["defect_score"] for e in img], [not e.get("defect_free") for e in img]),
                         float(np.mean(ok)) if ok else None, float(np.mean(bad)) if bad else None)


def benchmark_mean(scores: list[DatasetScores]) -> dict:
    """Class mean (every class of every dataset) and dataset mean."""
    ious = [v for s in scores for v in s.class_iou.values()]
    return {"class_mean_miou": float(np.mean(ious)) if ious else 0.0,
            "dataset_mean_miou": float(np.mean([s.miou for s in scores])) if scores else 0.0,
            "dataset_mean_fbiou": float(np.mean([s.fbiou for s in scores])) if scores else 0.0}

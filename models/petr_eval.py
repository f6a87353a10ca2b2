"""Decoding of PETR outputs and a nuScenes-style detection evaluator (numpy only).

Matching and AP follow the nuScenes detection benchmark:

* A prediction matches the nearest not-yet-matched ground-truth box of its class in its scene if the
  centre distance on the ground plane (x, y) is below the threshold; predictions are taken greedily
  in order of decreasing score over the whole set. Thresholds 0.5, 1, 2 and 4 m.
* AP: precision is interpolated linearly in recall, between the operating points at which each true
  positive is found, at 101 recall levels 0, 0.01, ..., 1 (precision 0 above the highest recall
  reached, and the first point's precision below its recall). The levels at or below min_recall = 0.1
  are dropped, min_precision = 0.1 is subtracted, negatives clipped, and the mean is divided by
  1 - min_precision, so a perfect detector scores 1.
* mAP is the mean AP over classes (those with ground truth) and thresholds.
* TP errors at the 2 m threshold, averaged over the true positives of a class, then over classes:
  ATE = centre distance on the ground plane (m); ASE = 1 - IoU of the two boxes after aligning their
  centres and headings; AOE = smallest yaw difference (rad; modulo π for barriers, which look the
  same both ways). A class with no true positive counts error 1.
* NDS-like = (5·mAP + Σ_{ATE, ASE, AOE} (1 - min(1, err))) / 8: nuScenes' NDS without the velocity
  and attribute errors, which this data does not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DIST_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
TP_THRESHOLD = 2.0
MIN_RECALL = 0.1
MIN_PRECISION = 0.1
RECALL_LEVELS = 101
SYMMETRIC_CLASSES = frozenset({"barrier"})  # yaw errors taken modulo π


@dataclass
class Detections:
    """Scored boxes of one scene: boxes (M, 7) x, y, z, w, l, h, yaw; labels (M,); scores (M,)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


@dataclass
class GroundTruth:
    """Boxes (M, 7) x, y, z, w, l, h, yaw and labels (M,) of one scene."""

    boxes: np.ndarray
    labels: np.ndarray


@dataclass
class EvalResult:
    mAP: float
    NDS: float
    mATE: float
    mASE: float
    mAOE: float
    ap: dict[str, dict[float, float]] = field(default_factory=dict)  # class -> threshold -> AP
    tp_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> {ATE, ASE, AOE}

    def summary(self) -> str:
        lines = [f"mAP {self.mAP:.4f}  NDS {self.NDS:.4f}  mATE {self.mATE:.3f}  mASE {self.mASE:.3f}  mAOE {self.mAOE:.3f}"]
        for name, per_th in self.ap.items():
            aps = " ".join(f"{th:g}m:{v:.3f}" for th, v in per_th.items())
            err = self.tp_errors[name]
            lines.append(f"  {name:<11} AP {aps}  ATE {err['ATE']:.3f} ASE {err['ASE']:.3f} AOE {err['AOE']:.3f}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"mAP": self.mAP, "NDS": self.NDS, "mATE": self.mATE, "mASE": self.mASE, "mAOE": self.mAOE,
                "ap": {c: {str(k): v for k, v in d.items()} for c, d in self.ap.items()}, "tp_errors": self.tp_errors}


def decode_detections(cls_logits: np.ndarray, boxes: np.ndarray, max_detections: int = 300) -> Detections:
    """One scene's outputs -> detections, as PETR's NMS-free coder does.

    cls_logits (Q, C) and metric boxes (Q, 8) = (x, y, z, w, l, h, sin, cos). Every (query, class) pair
    is a candidate with score sigmoid(logit); the `max_detections` best are kept.
    """
    cls_logits, boxes = np.asarray(cls_logits, dtype=np.float64), np.asarray(boxes, dtype=np.float64)
    scores = 1.0 / (1.0 + np.exp(-cls_logits.reshape(-1)))
    keep = np.argsort(-scores, kind="stable")[:max_detections]
    query, label = np.divmod(keep, cls_logits.shape[1])
    b = boxes[query]
    yaw = np.arctan2(b[:, 6], b[:, 7])
    return Detections(np.concatenate([b[:, :6], yaw[:, None]], axis=1), label, scores[keep])


def average_precision(is_tp: np.ndarray, num_gt: int, min_recall: float = MIN_RECALL,
                      min_precision: float = MIN_PRECISION) -> float:
    """nuScenes-style AP of a score-sorted sequence of true/false positives (see the module docstring)."""
    is_tp = np.asarray(is_tp, dtype=bool)
    if num_gt <= 0:
        return float("nan")
    if not is_tp.any():
        return 0.0
    tp_count = np.cumsum(is_tp)
    recall = tp_count[is_tp] / num_gt
    precision = tp_count[is_tp] / (np.flatnonzero(is_tp) + 1)
    levels = np.linspace(0.0, 1.0, RECALL_LEVELS)
    interpolated = np.interp(levels, recall, precision)
    interpolated[levels > recall[-1] + 1e-9] = 0.0  # precision is 0 past the highest recall reached
    kept = interpolated[round(100 * min_recall) + 1:] - min_precision
    return float(np.clip(kept, 0, None).mean() / (1.0 - min_precision))


def _ground_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Centre distances on the ground plane between boxes a (M, 7) and b (K, 7): (M, K)."""
    return np.linalg.norm(a[:, None, :2] - b[None, :, :2], axis=-1)


def aligned_iou(size_a: np.ndarray, size_b: np.ndarray) -> np.ndarray:
    """IoU of boxes of sizes (w, l, h) once centres and headings are aligned: (M,) from (M, 3), (M, 3)."""
    inter = np.prod(np.minimum(size_a, size_b), axis=-1)
    return inter / (np.prod(size_a, axis=-1) + np.prod(size_b, axis=-1) - inter)


def yaw_difference(yaw_a: np.ndarray, yaw_b: np.ndarray, period: float = 2 * math.pi) -> np.ndarray:
    """Smallest absolute angle between headings, for a symmetry period of 2π or π: in [0, period/2]."""
    diff = np.mod(yaw_a - yaw_b, period)
    return np.minimum(diff, period - diff)


def greedy_match(scene_of_pred: np.ndarray, pred_boxes: np.ndarray, gts: list[np.ndarray],
                 threshold: float) -> np.ndarray:
    """For score-sorted predictions of one class, the matched ground-truth index in its scene, or -1."""
    matched = -np.ones(len(scene_of_pred), dtype=np.int64)
    taken = [np.zeros(len(g), dtype=bool) for g in gts]
    for i, scene in enumerate(scene_of_pred):
        gt = gts[scene]
        if len(gt) == 0:
            continue
        dist = _ground_distance(pred_boxes[i:i + 1], gt)[0]
        dist[taken[scene]] = np.inf
        j = int(np.argmin(dist))
        if dist[j] < threshold:
            matched[i], taken[scene][j] = j, True
    return matched


def evaluate(detections: Sequence[Detections], ground_truths: Sequence[GroundTruth], class_names: Sequence[str],
             dist_thresholds: Sequence[float] = DIST_THRESHOLDS, tp_threshold: float = TP_THRESHOLD) -> EvalResult:
    """mAP, TP errors and the NDS-like score of per-scene detections against ground truth."""
    assert len(detections) == len(ground_truths), "one Detections and one GroundTruth per scene"
    ap: dict[str, dict[float, float]] = {}
    tp_errors: dict[str, dict[str, float]] = {}
    for label, name in enumerate(class_names):
        gts = [g.boxes[g.labels == label] for g in ground_truths]
        num_gt = sum(len(g) for g in gts)
        if num_gt == 0:
            continue  # nothing to find: the class is left out of the means
        scene_of_pred, boxes, scores = [], [], []
        for s, det in enumerate(detections):
            mine = det.labels == label
            scene_of_pred.append(np.full(int(mine.sum()), s))
            boxes.append(det.boxes[mine])
            scores.append(det.scores[mine])
        scene_of_pred, boxes, scores = np.concatenate(scene_of_pred), np.concatenate(boxes), np.concatenate(scores)
        order = np.argsort(-scores, kind="stable")
        scene_of_pred, boxes = scene_of_pred[order], boxes[order].reshape(-1, 7)
        ap[name] = {}
        for th in dist_thresholds:
            matched = greedy_match(scene_of_pred, boxes, gts, th)
            ap[name][th] = average_precision(matched >= 0, num_gt)
            if th == tp_threshold:
                tp_errors[name] = _tp_errors(boxes, scene_of_pred, matched, gts, period=math.pi if name in SYMMETRIC_CLASSES else 2 * math.pi)
    m_ap = float(np.mean([v for per_th in ap.values() for v in per_th.values()])) if ap else 0.0
    means = {k: float(np.mean([e[k] for e in tp_errors.values()])) if tp_errors else 1.0 for k in ("ATE", "ASE", "AOE")}
    nds = (5 * m_ap + sum(1 - min(1.0, v) for v in means.values())) / 8
    return EvalResult(m_ap, nds, means["ATE"], means["ASE"], means["AOE"], ap, tp_errors)


def _tp_errors(boxes: np.ndarray, scene_of_pred: np.ndarray, matched: np.ndarray, gts: list[np.ndarray],
               period: float) -> dict[str, float]:
    """Mean ATE, ASE, AOE over the true positives of one class (1.0 each when there are none)."""
    tp = np.flatnonzero(matched >= 0)
    if len(tp) == 0:
        return {"ATE": 1.0, "ASE": 1.0, "AOE": 1.0}
    gt = np.stack([gts[scene_of_pred[i]][matched[i]] for i in tp])
    pred = boxes[tp]
    return {"ATE": float(np.linalg.norm(pred[:, :2] - gt[:, :2], axis=1).mean()),
            "ASE": float((1 - aligned_iou(pred[:, 3:6], gt[:, 3:6])).mean()),
            "AOE": float(yaw_difference(pred[:, 6], gt[:, 6], period).mean())}

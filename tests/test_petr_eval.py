"""The nuScenes-style evaluator on hand-made cases whose scores are known exactly."""

import math

import numpy as np
import pytest

from onnxq_models.petr_eval import (
    Detections,
    GroundTruth,
    aligned_iou,
    average_precision,
    decode_detections,
    evaluate,
    greedy_match,
    yaw_difference,
)

CLASSES = ("car", "barrier")


def box(x, y, w=2.0, l=4.0, h=1.5, yaw=0.0):
    return [x, y, h / 2, w, l, h, yaw]


def gt(boxes, labels):
    return GroundTruth(np.array(boxes, dtype=float).reshape(-1, 7), np.array(labels))


def det(boxes, labels, scores):
    return Detections(np.array(boxes, dtype=float).reshape(-1, 7), np.array(labels), np.array(scores, dtype=float))


# AP with the 101 recall levels, levels <= 0.1 dropped and min precision 0.1:
# precision 1 up to recall r and 0 after gives sum over levels 0.11..r of 0.9, over 90 levels, / 0.9.
def ap_perfect_up_to(recall_percent: int) -> float:
    return (recall_percent - 10) * 0.9 / 90 / 0.9


def test_average_precision_perfect_and_empty():
    assert average_precision(np.array([True, True, True]), 3) == pytest.approx(1.0)
    assert average_precision(np.array([False, False]), 3) == 0.0
    assert average_precision(np.array([], dtype=bool), 3) == 0.0
    assert math.isnan(average_precision(np.array([True]), 0))


def test_average_precision_half_recall():
    # 2 ground truths, one found with precision 1: AP = 40 levels (0.11..0.50) of 0.9 / 90 / 0.9 = 4/9.
    assert average_precision(np.array([True]), 2) == pytest.approx(4 / 9)
    assert average_precision(np.array([True]), 2) == pytest.approx(ap_perfect_up_to(50))
    # A false positive after the last true positive changes nothing.
    assert average_precision(np.array([True, False, False]), 2) == pytest.approx(4 / 9)


def test_average_precision_interpolates_between_true_positives():
    # 4 ground truths; TP, TP, FP, TP: operating points (0.25, 1), (0.5, 1), (0.75, 0.75).
    # Levels 0.11..0.50 give 0.9 each (36 in all); 0.51..0.75 lie on the line p = 1.5 - r and give
    # sum(1.4 - r) = 35 - 15.75 = 19.25; above 0.75 precision is 0. AP = 55.25 / 90 / 0.9.
    assert average_precision(np.array([True, True, False, True]), 4) == pytest.approx(55.25 / 81)


def test_greedy_matching_takes_scores_in_order():
    gts = [np.array([box(0, 0), box(3, 0)], dtype=float)]
    # The best-scored prediction sits between both ground truths, nearer the first; the second
    # prediction is exactly on the first but must take the other one (within 4 m) or nothing.
    preds = np.array([box(1.0, 0), box(0, 0)], dtype=float)
    assert greedy_match(np.array([0, 0]), preds, gts, 4.0).tolist() == [0, 1]
    assert greedy_match(np.array([0, 0]), preds, gts, 2.0).tolist() == [0, -1]


def test_perfect_detector_scores_one():
    truths = [gt([box(5, 5), box(-10, 3, 2.2, 0.5, 1.0, 0.3)], [0, 1]), gt([box(20, -4, yaw=1.0)], [0])]
    dets = [det(t.boxes, t.labels, [0.9] * len(t.labels)) for t in truths]
    result = evaluate(dets, truths, CLASSES)
    assert result.mAP == pytest.approx(1.0)
    assert (result.mATE, result.mASE, result.mAOE) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert result.NDS == pytest.approx(1.0)


def test_nothing_detected_scores_zero():
    truths = [gt([box(5, 5)], [0])]
    result = evaluate([det([], [], [])], truths, CLASSES)
    assert result.mAP == 0.0 and result.NDS == 0.0
    assert list(result.ap) == ["car"]  # barrier has no ground truth: left out of the means


def test_distance_thresholds():
    # A car predicted 1.5 m off: a true positive at 2 m and 4 m, a miss at 0.5 m and 1 m.
    truths = [gt([box(10, 0)], [0])]
    dets = [det([box(11.5, 0)], [0], [0.8])]
    result = evaluate(dets, truths, CLASSES)
    assert result.ap["car"] == pytest.approx({0.5: 0.0, 1.0: 0.0, 2.0: 1.0, 4.0: 1.0})
    assert result.mAP == pytest.approx(0.5)
    assert result.mATE == pytest.approx(1.5)
    # NDS = (5 * 0.5 + (1 - 1) + (1 - 0) + (1 - 0)) / 8: ATE 1.5 m counts as error 1.
    assert result.NDS == pytest.approx(4.5 / 8)


def test_wrong_class_is_a_false_positive():
    truths = [gt([box(10, 0)], [0])]
    result = evaluate([det([box(10, 0)], [1], [0.9])], truths, CLASSES)
    assert result.mAP == 0.0


def test_tp_errors():
    truths = [gt([box(0, 0, 2.0, 4.0, 1.5, yaw=0.0), box(30, 0, 2.0, 0.5, 1.0, yaw=0.2)], [0, 1])]
    dets = [det([box(0.3, 0.4, 1.0, 4.0, 1.5, yaw=0.5), box(30, 0, 2.0, 0.5, 1.0, yaw=0.2 + math.pi)], [0, 1], [0.9, 0.9])]
    result = evaluate(dets, truths, CLASSES)
    car, barrier = result.tp_errors["car"], result.tp_errors["barrier"]
    assert car["ATE"] == pytest.approx(0.5)  # 0.3, 0.4 -> 0.5 m
    assert car["ASE"] == pytest.approx(0.5)  # half the volume inside the other: IoU 1/2
    assert car["AOE"] == pytest.approx(0.5)
    assert barrier["AOE"] == pytest.approx(0.0, abs=1e-12)  # barriers look the same turned by π
    assert result.mAOE == pytest.approx(0.25)


def test_geometry_helpers():
    assert aligned_iou(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 3.0]]))[0] == pytest.approx(1.0)
    assert aligned_iou(np.array([[2.0, 2.0, 2.0]]), np.array([[1.0, 1.0, 1.0]]))[0] == pytest.approx(1 / 8)
    assert yaw_difference(np.array([3.0]), np.array([-3.0]))[0] == pytest.approx(2 * math.pi - 6.0)
    assert yaw_difference(np.array([0.1]), np.array([0.1 + math.pi]), math.pi)[0] == pytest.approx(0.0, abs=1e-12)


def test_decode_detections_keeps_best_query_class_pairs():
    logits = np.full((3, 2), -10.0)
    logits[2, 1] = 3.0  # best: query 2 as class 1
    logits[0, 0] = 1.0  # second: query 0 as class 0
    boxes = np.zeros((3, 8))
    boxes[:, 3:6] = 1.0
    boxes[2, :3] = [1.0, 2.0, 0.5]
    boxes[2, 6:] = [1.0, 0.0]  # sin 1, cos 0: yaw π/2
    dets = decode_detections(logits, boxes, max_detections=2)
    assert dets.labels.tolist() == [1, 0]
    assert dets.scores == pytest.approx([1 / (1 + math.exp(-3.0)), 1 / (1 + math.exp(-1.0))])
    assert dets.boxes[0].tolist() == pytest.approx([1.0, 2.0, 0.5, 1.0, 1.0, 1.0, math.pi / 2])

"""Non-maximum suppression: the greedy invariants, as properties over random boxes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecompute_ml._tasks.detection import batched_nms, box_iou, nms, postprocess

coordinate = st.floats(0, 100, allow_nan=False, width=32)


@st.composite
def boxes_and_scores(draw):
    n = draw(st.integers(0, 25))
    boxes = []
    for _ in range(n):
        x, y = draw(coordinate), draw(coordinate)
        w, h = draw(st.floats(0.5, 60, width=32)), draw(st.floats(0.5, 60, width=32))
        boxes.append([x, y, x + w, y + h])
    scores = draw(st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=n, max_size=n))
    classes = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    return (torch.tensor(boxes, dtype=torch.float32).reshape(n, 4), torch.tensor(scores, dtype=torch.float32),
            torch.tensor(classes, dtype=torch.long))


@settings(max_examples=150, deadline=None)
@given(boxes_and_scores(), st.floats(0.05, 0.95))
def test_nms_keeps_exactly_the_greedy_survivors(data, threshold):
    boxes, scores, classes = data
    keep = batched_nms(boxes, scores, classes, threshold).tolist()
    assert len(set(keep)) == len(keep)
    assert [float(scores[k]) for k in keep] == sorted((float(scores[k]) for k in keep), reverse=True)
    iou = box_iou(boxes, boxes)
    kept = set(keep)
    for i in range(len(boxes)):
        same_class_kept = [k for k in keep if k != i and classes[k] == classes[i]]
        if i in kept:  # no kept box of its class overlaps it too much
            assert all(iou[i, k] <= threshold + 1e-6 for k in same_class_kept)
        else:  # dropped only for a kept box of its class, scoring at least as high, overlapping too much
            assert any(iou[i, k] > threshold - 1e-6 and scores[k] >= scores[i] for k in same_class_kept)


@settings(max_examples=50, deadline=None)
@given(boxes_and_scores())
def test_threshold_one_keeps_everything(data):
    boxes, scores, _ = data
    assert sorted(nms(boxes, scores, 1.0).tolist()) == list(range(len(boxes)))


def test_iou_of_known_boxes():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0]]))


def test_postprocess_scales_thresholds_and_suppresses():
    # three queries: two overlapping "cat" boxes and one "dog"; relative cx, cy, w, h
    probs = torch.tensor([[0.9, 0.05], [0.8, 0.1], [0.1, 0.7]])
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.52, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    out = postprocess(probs, boxes, ["cat", "dog"], (200, 100), threshold=0.5, iou_threshold=0.5)
    assert [(d.label, d.score) for d in out] == [("cat", pytest.approx(0.9)), ("dog", pytest.approx(0.7))]
    assert out[0].box == pytest.approx((50.0, 25.0, 150.0, 75.0))
    assert postprocess(probs, boxes, ["cat", "dog"], (200, 100), threshold=0.95) == []

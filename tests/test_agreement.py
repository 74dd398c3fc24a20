"""What the detection agreement can and cannot see (eval/agreement.py): box IoU, the validator's one-to-one matching,
the matched detections' figures, the fine check and the explanation, on hand-worked examples; then a yolo11n whose
head is perturbed on purpose, which the hysteresis agreement passes at 1.00 and the fine check fails."""

from __future__ import annotations

import copy
from dataclasses import MISSING, asdict, fields

import numpy as np
import pytest
import torch

from yolo_tq.eval.agreement import (FINE_IOU, MATCH_IOU, Agreement, compare_outputs, fine_check, iou_matrix,
                                    match_detections, match_pairs, matched_summary, merge_diffs, output_diffs,
                                    pair_figures, shift_tolerated)


# ---------------------------------------------------------------------------------------------- box geometry
def test_iou_matrix_by_hand():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [3, 3, 3, 8]], np.float32)
    # overlap 5 x 10 = 50 of a union of 100 + 100 - 50 = 150; itself; disjoint; a zero-area box
    assert iou_matrix(a, b) == pytest.approx(np.array([[1 / 3, 1.0, 0.0, 0.0]]))
    assert iou_matrix(np.zeros((0, 6)), b).shape == (0, 4)
    z = np.zeros((1, 4), np.float32)
    assert iou_matrix(z, z)[0, 0] == 0.0  # no division by a zero union


def test_shift_tolerated_is_where_iou_reaches_the_threshold():
    assert shift_tolerated(12.0, 0.5) == pytest.approx(4.0)  # a third of the side
    assert shift_tolerated(19.0, 0.9) == pytest.approx(1.0)  # a 19th
    # the same by IoU: [0, 12] moved by 4 overlaps 8 of a union 16; [0, 19] moved by 1 overlaps 18 of 20
    assert iou_matrix([[0, 0, 12, 12]], [[4, 0, 16, 12]])[0, 0] == pytest.approx(0.5)
    assert iou_matrix([[0, 0, 19, 5]], [[1, 0, 20, 5]])[0, 0] == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------------ matching
def test_match_pairs_by_hand():
    ref = np.array([[0, 0, 10, 10, 0.9, 0], [2, 0, 12, 10, 0.8, 0]], np.float32)
    # the most confident takes its best (ref 1: 95 / 105); the next takes what is left (ref 0: 80 / 120)
    out = np.array([[2, 0, 12, 10, 0.7, 0], [1.5, 0, 11.5, 10, 0.95, 0]], np.float32)
    pairs = match_pairs(ref, out)
    assert [(k, j) for k, j, _ in pairs] == [(1, 1), (0, 0)]
    assert [iou for _, _, iou in pairs] == pytest.approx([95 / 105, 80 / 120])
    assert match_pairs(ref, out, iou_thr=0.7) == [pairs[0]]  # 0.667 no longer counts
    wrong_class = out.copy()
    wrong_class[:, 5] = 1
    assert match_pairs(ref, wrong_class) == [] and match_pairs(ref, np.zeros((0, 6))) == []
    assert match_pairs(np.zeros((0, 6)), out) == []


def test_match_pairs_counts_what_the_validator_counts():
    """match_pairs finds as many matches as match_detections (Ultralytics' match_predictions) on random sets: jittered
    copies of crowded reference boxes, some of another class, among extra boxes."""
    rng = np.random.default_rng(0)

    def boxes(n):
        xy = rng.uniform(0, 40, (n, 2))
        return np.concatenate([xy, xy + rng.uniform(8, 20, (n, 2)), rng.uniform(0.2, 1, (n, 1)),
                               rng.integers(0, 2, (n, 1))], 1).astype(np.float32)

    counts = []
    for _ in range(30):
        ref = boxes(int(rng.integers(1, 8)))
        out = ref + np.concatenate([rng.normal(0, 3, (len(ref), 4)), rng.uniform(-0.2, 0, (len(ref), 1)),
                                    rng.random((len(ref), 1)) < 0.2], 1).astype(np.float32)
        out[:, 5] %= 2
        out = np.concatenate([out, boxes(int(rng.integers(0, 4)))])
        for thr in (MATCH_IOU, 0.3):
            counts.append(len(match_pairs(ref, out, thr)))
            assert counts[-1] == match_detections(ref, out, thr)
    assert sum(counts) > 100 and len(set(counts)) > 3  # the sets did overlap, in varied numbers


def test_pair_figures_and_summary_by_hand():
    ref = np.array([[0, 0, 10, 20, 0.9, 0]], np.float32)
    out = np.array([[1, 0, 11, 20, 0.8, 0]], np.float32)
    f = pair_figures(ref, out, match_pairs(ref, out))
    # IoU 9 x 20 / (200 + 200 - 180); |Δscore| 0.1; every edge moved by at most 1 px; shorter side 10 px
    assert f == pytest.approx(np.array([[180 / 220, 0.1, 1.0, 10.0]]))
    s = matched_summary(np.concatenate([f, [[1.0, 0.0, 0.0, 30.0]]]))
    assert s == pytest.approx({"matched_iou_mean": (180 / 220 + 1) / 2, "matched_iou_min": 180 / 220,
                               "matched_score_max_abs": 0.1, "matched_box_max_abs": 1.0, "matched_min_side": 10.0})
    assert set(matched_summary(np.zeros((0, 4))).values()) == {None}


def test_fine_check():
    assert not fine_check(0, 0, None)  # nothing to check is no pass
    assert fine_check(10, 9, 0.01)
    assert not fine_check(10, 8, 0.01)  # 0.8 < 0.9 found at FINE_IOU
    assert not fine_check(10, 10, 0.06)  # a matched score moved by more than 0.05


def test_raw_max_location_and_merge():
    ref = np.zeros((1, 6, 4), np.float32)
    ref[0, :4] = [[10, 20, 30, 40]] * 4
    ref[0, 4] = [0.9, 0.01, 0.02, 0.03]
    out = ref.copy()
    out[0, 2, 1] += 5.0  # anchor 1, scored 0.01
    d = output_diffs(ref, out)
    assert d["max_abs"] == pytest.approx(5.0) and d["score_at_max_abs"] == pytest.approx(0.01)
    assert d["box_scale"] == pytest.approx(40.0)
    other = {**d, "max_abs": 2.0, "score_at_max_abs": 0.5, "box_scale": 60.0}
    m = merge_diffs([other, d])
    assert m["score_at_max_abs"] == pytest.approx(0.01) and m["box_scale"] == 60.0 and m["max_abs"] == 5.0


# --------------------------------------------------------------------------------- compare_outputs, synthetic
def _raw(n: int = 8) -> np.ndarray:
    """A (1, 4 + 2, n) prediction: anchor 0 a 20 x 20 box of class 0 at 0.9, anchor 1 a 30 x 40 box of class 1 at
    0.8, the rest background (0.01) with boxes of at most 150 px."""
    p = np.zeros((1, 6, n), np.float32)
    p[0, :4] = np.array([[50, 50, 20, 20], [150, 100, 30, 40]] + [[100, 100, 10, 10]] * (n - 2), np.float32).T
    p[0, 4:] = 0.01
    p[0, 4, 0], p[0, 5, 1] = 0.9, 0.8
    return p


def test_identical_outputs_pass_everything():
    a = compare_outputs([_raw()], [_raw()], "fp32")
    assert a.passed and a.det_agreement == 1.0 and a.fine_passed and a.fine_found == a.sure_detections == 4
    assert a.matched_iou_mean == pytest.approx(1.0) and a.detections_matched == 2
    assert "FAILED" not in a.explanation and "2 detections matched" in a.explanation


def test_moved_boxes_pass_the_agreement_but_fail_the_fine_check():
    out = _raw()
    out[0, 0, :2] += 2.0  # both detections move right by 2 px
    a = compare_outputs([_raw()], [out], "fp32", activation_rounding=True)
    assert a.det_agreement == 1.0 and a.passed  # IoU 18/22 and 28/32 are far above 0.5: the agreement is blind
    assert a.matched_iou_min == pytest.approx(18 / 22) and a.matched_iou_mean == pytest.approx((18 / 22 + 28 / 32) / 2)
    assert a.matched_box_max_abs == pytest.approx(2.0) and a.fine_found == 0 and a.fine_agreement == 0.0
    assert not a.fine_passed and "FAILED" in a.explanation
    assert 18 / 22 < FINE_IOU


def test_a_lowered_score_passes_the_agreement_but_fails_the_fine_check():
    out = _raw()
    out[0, 4, 0] = 0.7  # 0.9 -> 0.7: still sure (>= 0.35)
    a = compare_outputs([_raw()], [out], "fp32", activation_rounding=True)
    assert a.det_agreement == 1.0 and a.fine_found == 4 and a.matched_score_max_abs == pytest.approx(0.2)
    assert not a.fine_passed


def test_a_raw_max_on_a_background_anchor_is_located():
    out = _raw()
    out[0, 2, 5] += 30.0  # a background anchor's width
    a = compare_outputs([_raw()], [out], "fp32", activation_rounding=True)
    assert a.max_abs == pytest.approx(30.0) and a.box_scale == pytest.approx(150.0)
    assert a.max_abs_box_rel == pytest.approx(0.2) and a.score_at_max_abs == pytest.approx(0.01)
    assert a.max_abs_box_confident == 0.0 and a.fine_passed and a.passed
    assert "max|Δ| 30 is a box coordinate (20% of the box scale 150 px) on an anchor the reference scores 0.01" \
        in a.explanation
    assert not compare_outputs([_raw()], [out], "fp32").passed  # without rounding the FP32 tolerance holds


def test_no_detections_are_an_agreement_of_nothing():
    quiet = _raw()
    quiet[0, 4:] = np.minimum(quiet[0, 4:], 0.1)
    moved = quiet.copy()
    moved[0, :4] += 3.0
    a = compare_outputs([quiet], [moved], "fp32", activation_rounding=True)
    assert a.det_agreement == 1.0 and a.sure_detections == 0 and a.passed  # the verdict as before
    assert a.fine_passed is False and a.fine_agreement is None and "compared nothing" in a.explanation
    assert "no anchor scores >= 0.25" in a.explanation


def test_agreement_records_round_trip_and_old_records_load():
    a = compare_outputs([_raw()], [_raw()], "int8")
    assert Agreement(**asdict(a)) == a
    before = [f.name for f in fields(Agreement) if f.default is MISSING]  # what records held before the fine check
    assert len(before) == 16 and "fine_passed" not in before
    old = Agreement(**{k: v for k, v in asdict(a).items() if k in before})
    assert old.fine_passed is None and old.explanation == "" and old.det_agreement == a.det_agreement


# ---------------------------------------------------------------------------------------- a perturbed yolo11n
@pytest.fixture(scope="module")
def yolo11n_refs(shared_weights, shared_data):
    from yolo_tq.eval.agreement import check_inputs
    from yolo_tq.io import load_model

    model, _ = load_model(shared_weights)
    model = model.float().eval()
    xs = check_inputs(str(shared_data), 320, 1, 4)
    return model, xs, _run(model, xs)


def _run(model, xs):
    with torch.inference_mode():
        return [model(torch.from_numpy(x))[0].numpy() for x in xs]


def test_a_perturbed_head_is_seen_by_the_fine_check(yolo11n_refs):
    """Raising the box distributions' upper bins (DFL) enlarges every box by several px, lowering the class logits by
    0.5 lowers every score by about a tenth: the hysteresis agreement reads 1.00 for both, the fine check fails."""
    model, xs, refs = yolo11n_refs
    same = compare_outputs(refs, _run(copy.deepcopy(model), xs), "fp32", activation_rounding=True)
    assert same.fine_passed and same.sure_detections >= 10
    boxes, scores = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for seq in boxes.model[-1].cv2:
            seq[-1].bias.view(4, -1).add_(0.4 * torch.arange(16.0))
        for seq in scores.model[-1].cv3:
            seq[-1].bias.sub_(0.5)
    moved = compare_outputs(refs, _run(boxes, xs), "fp32", activation_rounding=True)
    assert moved.det_agreement == 1.0 and moved.passed, moved.explanation
    assert moved.matched_iou_mean < FINE_IOU and moved.matched_box_max_abs > 5.0 and not moved.fine_passed
    lowered = compare_outputs(refs, _run(scores, xs), "fp32", activation_rounding=True)
    assert lowered.det_agreement == 1.0 and lowered.matched_score_max_abs > 0.05 and not lowered.fine_passed

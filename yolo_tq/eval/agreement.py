"""Does an export reproduce the PyTorch model? Raw-output differences of the (B, 4 + nc, N) prediction before NMS
and detection agreement after it, judged by the criterion for the export's precision (docs/method.md, "Agreement");
beside them what that agreement cannot see: the matched detections' IoU and score differences and the fine check."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

FP32_BOX_TOL_PX = 0.25
FP32_SCORE_TOL = 1e-3
REDUCED_MIN_AGREEMENT = 0.9
CONF = 0.25  # Ultralytics' predict threshold: the "confident anchors" figures and det_f1
CONF_SURE = 0.35  # a detection the other side must reproduce ...
CONF_LOOSE = 0.15  # ... at least at this score
NMS_IOU = 0.7  # Ultralytics' predict default
MATCH_IOU = 0.5
FINE_IOU = 0.9  # the fine check: a sure detection found at this IoU (a shift of 1/19 of a box side) ...
FINE_SCORE_TOL = 0.05  # ... and matched detections' scores within this


class AgreementError(ValueError):
    """Outputs that cannot be compared (shape mismatch)."""


def output_diffs(ref: np.ndarray, out: np.ndarray, conf: float = CONF) -> dict:
    """Max |out - ref| overall, over box and score channels, and over anchors the reference scores >= conf."""
    ref = np.asarray(ref, dtype=np.float32)
    out = np.asarray(out, dtype=np.float32)
    if ref.shape != out.shape:
        raise AgreementError(f"output shape {tuple(out.shape)} differs from PyTorch's {tuple(ref.shape)}")
    if ref.ndim != 3 or ref.shape[1] < 5:
        raise AgreementError(f"expected a (B, 4 + nc, N) prediction tensor, got shape {tuple(ref.shape)}")
    d = np.abs(out - ref)
    confident = ref[:, 4:].max(axis=1) >= conf  # (B, N)
    dbox, dscore = d[:, :4], d[:, 4:]
    anchors = int(confident.sum())
    pick = lambda a: float(a.transpose(0, 2, 1)[confident].max()) if anchors else 0.0  # noqa: E731
    b, _, n = np.unravel_index(int(d.argmax()), d.shape)
    return {"max_abs": float(d.max()), "max_abs_box": float(dbox.max()), "max_abs_score": float(dscore.max()),
            "mean_abs_score": float(dscore.mean()), "confident_anchors": anchors,
            "max_abs_box_confident": pick(dbox), "max_abs_score_confident": pick(dscore),
            "score_at_max_abs": float(ref[b, 4:, n].max()), "box_scale": float(np.abs(ref[:, :4]).max())}


def merge_diffs(parts: list[dict]) -> dict:
    """Combine output_diffs of several inputs (max of maxima, mean of means, sum of counts; the score at the max
    from the input holding the largest max_abs)."""
    if not parts:
        raise ValueError("no diffs to merge")
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        out[k] = sum(vals) if k == "confident_anchors" else (float(np.mean(vals)) if k.startswith("mean") else max(vals))
    if "score_at_max_abs" in out:
        out["score_at_max_abs"] = max(parts, key=lambda p: p["max_abs"])["score_at_max_abs"]
    return out


def detections(pred: np.ndarray, conf: float = CONF, iou: float = NMS_IOU) -> list[np.ndarray]:
    """Ultralytics NMS on a raw (B, 4 + nc, N) prediction: per image an (n, 6) array x1, y1, x2, y2, score, class."""
    from ultralytics.utils.nms import non_max_suppression

    out = non_max_suppression(torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32)), conf, iou)
    return [o.numpy() for o in out]


def match_detections(ref: np.ndarray, out: np.ndarray, iou_thr: float = MATCH_IOU) -> int:
    """One-to-one matches (same class, IoU >= iou_thr) of rows x1, y1, x2, y2, score, cls, by Ultralytics'
    validator (match_predictions: each of `out`, most confident first, takes the best unclaimed one of `ref`)."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import box_iou

    if len(ref) == 0 or len(out) == 0:
        return 0
    ref, out = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (ref, out))
    out = out[torch.argsort(-out[:, 4], stable=True)]
    thresholds = SimpleNamespace(iouv=torch.tensor([iou_thr]))  # all that match_predictions reads of its validator
    correct = BaseValidator.match_predictions(thresholds, out[:, 5], ref[:, 5], box_iou(ref[:, :4], out[:, :4]))
    return int(correct.sum())


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of boxes given as rows x1, y1, x2, y2 (further columns ignored)."""
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])[:, None, :4]
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])[None, :, :4]
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = np.prod(a[..., 2:] - a[..., :2], -1) + np.prod(b[..., 2:] - b[..., :2], -1) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_pairs(ref: np.ndarray, out: np.ndarray, iou_thr: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """match_detections' one-to-one matches as (row of ref, row of out, IoU): each of `out`, most confident first,
    takes the best unclaimed same-class row of `ref` and keeps it if their IoU >= iou_thr."""
    ref, out = (np.asarray(x, np.float32).reshape(-1, 6) for x in (ref, out))
    iou = iou_matrix(ref, out) * (ref[:, None, 5] == out[None, :, 5])
    claimed, pairs = np.zeros(len(ref), bool), []
    for j in (np.argsort(-out[:, 4], kind="stable") if len(ref) else ()):
        free = np.where(claimed, 0.0, iou[:, j])
        k = int(free.argmax())
        if free[k] >= iou_thr and free[k] > 0:
            claimed[k] = True
            pairs.append((k, int(j), float(free[k])))
    return pairs


def pair_figures(ref: np.ndarray, out: np.ndarray, pairs: list[tuple[int, int, float]]) -> np.ndarray:
    """(len(pairs), 4): per matched pair its IoU, |Δscore|, the largest |Δ| of its four box edges (px) and the
    shorter side of the reference box (px)."""
    if not pairs:
        return np.zeros((0, 4))
    k, j, iou = (np.array(v) for v in zip(*pairs))
    r, o = np.asarray(ref, np.float64)[k], np.asarray(out, np.float64)[j]
    side = np.minimum(r[:, 2] - r[:, 0], r[:, 3] - r[:, 1])
    return np.stack([iou, np.abs(r[:, 4] - o[:, 4]), np.abs(r[:, :4] - o[:, :4]).max(1), side], 1)


def matched_summary(figures: np.ndarray) -> dict:
    """Mean and min IoU, max |Δscore| and max |Δbox edge| of matched pairs (pair_figures rows), and the smallest
    matched box's shorter side; None each when nothing matched."""
    keys = ("matched_iou_mean", "matched_iou_min", "matched_score_max_abs", "matched_box_max_abs", "matched_min_side")
    if len(figures) == 0:
        return dict.fromkeys(keys)
    f = np.asarray(figures, np.float64)
    return dict(zip(keys, map(float, (f[:, 0].mean(), f[:, 0].min(), f[:, 1].max(), f[:, 2].max(), f[:, 3].min()))))


def shift_tolerated(side: float, iou_thr: float) -> float:
    """The largest shift along one axis that keeps a box's IoU with itself >= iou_thr, for its side s along that
    axis: IoU = (s - d) / (s + d), so d = s (1 - t) / (1 + t) (s / 3 at t = 0.5, s / 19 at t = 0.9)."""
    return side * (1.0 - iou_thr) / (1.0 + iou_thr)


def fine_check(sure: int, fine_found: int, score_max_abs: float | None, min_agreement: float = REDUCED_MIN_AGREEMENT,
               score_tol: float = FINE_SCORE_TOL) -> bool:
    """Detections reproduced closely: some sure detection to check, >= min_agreement of them found at FINE_IOU, and
    matched scores within score_tol."""
    return sure > 0 and fine_found / sure >= min_agreement and score_max_abs is not None and score_max_abs <= score_tol


def f1_score(matched: int, n_ref: int, n_out: int) -> float:
    """2·matched / (n_ref + n_out); 1.0 when neither side detects anything."""
    if n_ref + n_out == 0:
        return 1.0
    return 2.0 * matched / (n_ref + n_out)


def found_share(sure_a: list[np.ndarray], loose_b: list[np.ndarray], sure_b: list[np.ndarray],
                loose_a: list[np.ndarray], iou_thr: float = MATCH_IOU) -> tuple[int, int]:
    """(found, total) over images: a's sure detections found among b's loose ones, and b's among a's."""
    found = total = 0
    for sa, lb, sb, la in zip(sure_a, loose_b, sure_b, loose_a):
        found += match_detections(sa, lb, iou_thr) + match_detections(sb, la, iou_thr)
        total += len(sa) + len(sb)
    return found, total


class Verdict(NamedTuple):
    passed: bool
    criterion: str


def verdict(precision: str, diffs: dict, det_agreement: float, min_agreement: float = REDUCED_MIN_AGREEMENT,
            box_tol: float = FP32_BOX_TOL_PX, score_tol: float = FP32_SCORE_TOL,
            activation_rounding: bool = False) -> Verdict:
    """Pass/fail of an export against PyTorch under the criterion for its precision; FP32 of a model that rounds
    its activations (BitLinear) is judged by detections too."""
    if precision not in ("fp32", "fp16", "bf16", "int8"):
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "fp32" and not activation_rounding:
        ok = diffs["max_abs_box"] <= box_tol and diffs["max_abs_score"] <= score_tol
        return Verdict(ok, f"fp32: max|Δbox| <= {box_tol:g} px and max|Δscore| <= {score_tol:g}")
    head = "fp32 with rounded activations (BitLinear; raw outputs flip at rounding boundaries)" \
        if precision == "fp32" else precision
    return Verdict(det_agreement >= min_agreement,
                   f"{head}: >= {min_agreement:g} of the detections either side scores >= {CONF_SURE:g} are found by "
                   f"the other at >= {CONF_LOOSE:g} (same class, IoU >= {MATCH_IOU:g})")


@dataclass(frozen=True)
class Agreement:
    """An export's outputs against PyTorch's: raw differences (output_diffs over the check inputs), detections at
    CONF and their F1, the hysteresis agreement, and the verdict. Then what the agreement cannot see: the raw max's
    size against the box scale and the score of its anchor, the matched detections' IoU and score differences, the
    fine check (the hysteresis agreement at FINE_IOU with matched scores within FINE_SCORE_TOL) and a line saying it
    all (explain). Defaults: records written before these fields existed."""

    max_abs: float
    max_abs_box: float
    max_abs_score: float
    mean_abs_score: float
    confident_anchors: int
    max_abs_box_confident: float
    max_abs_score_confident: float
    detections_ref: int
    detections_out: int
    detections_matched: int
    det_f1: float
    sure_detections: int
    sure_found: int
    det_agreement: float
    criterion: str
    passed: bool
    score_at_max_abs: float | None = None  # the reference's best class score on the anchor holding max_abs
    box_scale: float | None = None  # max |box value| of the reference (px)
    max_abs_box_rel: float | None = None  # max_abs_box / box_scale (scores lie in [0, 1]: absolute is relative)
    matched_iou_mean: float | None = None  # the detections_matched pairs at CONF (IoU >= MATCH_IOU, same class)
    matched_iou_min: float | None = None
    matched_score_max_abs: float | None = None
    matched_box_max_abs: float | None = None  # px, the largest edge difference of a matched pair
    matched_min_side: float | None = None  # px, the shorter side of the smallest matched reference box
    fine_found: int | None = None  # sure detections found at FINE_IOU (of sure_detections)
    fine_agreement: float | None = None
    fine_passed: bool | None = None
    explanation: str = ""


def _raw_text(a: Agreement) -> str:
    part = "box coordinate" if a.max_abs_box >= a.max_abs_score else "class score"
    rel = f" ({100 * a.max_abs_box_rel:.3g}% of the box scale {a.box_scale:.0f} px)" \
        if part == "box coordinate" and a.max_abs_box_rel is not None else ""
    confident = f"no anchor scores >= {CONF:g}" if not a.confident_anchors else (
        f"on the {a.confident_anchors} anchors scoring >= {CONF:g}: max|Δbox| {a.max_abs_box_confident:.3g} px, "
        f"max|Δscore| {a.max_abs_score_confident:.3g}")
    at = "" if a.score_at_max_abs is None else f" on an anchor the reference scores {a.score_at_max_abs:.2g}"
    return f"max|Δ| {a.max_abs:.3g} is a {part}{rel}{at}; {confident}."


def _match_text(a: Agreement) -> str:
    if a.sure_detections == 0:
        return (f"No detection scores >= {CONF_SURE:g} on either side: the detection agreement "
                f"{a.det_agreement:.2f} compared nothing.")
    if a.matched_iou_mean is None:
        return f"No detection at >= {CONF:g} matched the other side's."
    return (f"{a.detections_matched} detections matched: mean IoU {a.matched_iou_mean:.4f} (min "
            f"{a.matched_iou_min:.4f}), max|Δbox| {a.matched_box_max_abs:.3g} px, max|Δscore| "
            f"{a.matched_score_max_abs:.3g}. The agreement's IoU >= {MATCH_IOU:g} lets a box move by a third of its "
            f"side ({shift_tolerated(a.matched_min_side, MATCH_IOU):.3g} px on the smallest, "
            f"{a.matched_min_side:.3g} px) and a score by {CONF_SURE - CONF_LOOSE:.2g}.")


def explain(a: Agreement) -> str:
    """One paragraph: where the raw max lies, what the matched detections differ by, what the detection agreement
    tolerates, and the fine check."""
    fine = "" if a.fine_found is None else (
        f" Fine check (IoU >= {FINE_IOU:g}, matched |Δscore| <= {FINE_SCORE_TOL:g}): {a.fine_found} of "
        f"{a.sure_detections} sure detections found, {'passed' if a.fine_passed else 'FAILED'}.")
    return f"{_raw_text(a)} {_match_text(a)}{fine}"


def compare_outputs(refs: list[np.ndarray], outs: list[np.ndarray], precision: str,
                    min_agreement: float = REDUCED_MIN_AGREEMENT, activation_rounding: bool = False) -> Agreement:
    """The Agreement of an export's outputs with PyTorch's; `activation_rounding`: the model rounds activations."""
    diffs = merge_diffs([output_diffs(r, o) for r, o in zip(refs, outs)])
    dets = {(side, c): [d for x in xs for d in detections(x, conf=c)]
            for side, xs in (("ref", refs), ("out", outs)) for c in (CONF, CONF_SURE, CONF_LOOSE)}
    figures = [pair_figures(a, b, match_pairs(a, b)) for a, b in zip(dets["ref", CONF], dets["out", CONF])]
    matched = sum(map(len, figures))
    n_ref, n_out = sum(map(len, dets["ref", CONF])), sum(map(len, dets["out", CONF]))
    sure = dets["ref", CONF_SURE], dets["out", CONF_LOOSE], dets["out", CONF_SURE], dets["ref", CONF_LOOSE]
    found, total = found_share(*sure)
    fine_found, _ = found_share(*sure, iou_thr=FINE_IOU)
    agreement = found / total if total else 1.0
    v = verdict(precision, diffs, agreement, min_agreement, activation_rounding=activation_rounding)
    summary = matched_summary(np.concatenate(figures) if figures else np.zeros((0, 4)))
    scale = diffs.pop("box_scale")
    a = Agreement(**diffs, detections_ref=n_ref, detections_out=n_out, detections_matched=matched,
                  det_f1=f1_score(matched, n_ref, n_out), sure_detections=total, sure_found=found,
                  det_agreement=agreement, criterion=v.criterion, passed=v.passed, box_scale=scale,
                  max_abs_box_rel=diffs["max_abs_box"] / scale if scale > 0 else None, **summary,
                  fine_found=fine_found, fine_agreement=fine_found / total if total else None,
                  fine_passed=fine_check(total, fine_found, summary["matched_score_max_abs"], min_agreement))
    return replace(a, explanation=explain(a))


def check_image_paths(data: str | None, n: int) -> list[Path]:
    """The first n images of the data yaml's val split (sorted), or Ultralytics' bundled sample images."""
    if not data:
        from ultralytics.utils import ASSETS

        return sorted(p for p in Path(ASSETS).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    d = check_det_dataset(data)
    files: list[Path] = []
    for r in map(Path, d["val"] if isinstance(d["val"], list) else [d["val"]]):
        files += sorted(p for p in r.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS) if r.is_dir() else [r]
    if not files:
        raise FileNotFoundError(f"no images in the val split of {data}")
    return files[:n]


def check_inputs(data: str | None, imgsz: int, batch: int, n_images: int = 4) -> list[np.ndarray]:
    """Inputs for the agreement check: (batch, 3, imgsz, imgsz) float32 RGB in [0, 1] of real images (cycled if too
    few), letterboxed as Ultralytics does for a fixed-size export."""
    import cv2
    from ultralytics.data.augment import LetterBox

    box = LetterBox((imgsz, imgsz), auto=False)
    ims = [np.ascontiguousarray(box(image=cv2.imread(str(p)))[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0
           for p in check_image_paths(data, max(n_images, batch))]
    n_inputs = max(1, n_images // batch)
    return [np.stack([ims[(i * batch + k) % len(ims)] for k in range(batch)]) for i in range(n_inputs)]

"""Does an export reproduce the PyTorch model? Raw-output differences of the (B, 4 + nc, N) prediction before NMS
and detection agreement after it, judged by the criterion for the export's precision (docs/method.md, "Agreement")."""

from __future__ import annotations

from dataclasses import dataclass
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
    return {"max_abs": float(d.max()), "max_abs_box": float(dbox.max()), "max_abs_score": float(dscore.max()),
            "mean_abs_score": float(dscore.mean()), "confident_anchors": anchors,
            "max_abs_box_confident": pick(dbox), "max_abs_score_confident": pick(dscore)}


def merge_diffs(parts: list[dict]) -> dict:
    """Combine output_diffs of several inputs (max of maxima, mean of means, sum of counts)."""
    if not parts:
        raise ValueError("no diffs to merge")
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        out[k] = sum(vals) if k == "confident_anchors" else (float(np.mean(vals)) if k.startswith("mean") else max(vals))
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


def f1_score(matched: int, n_ref: int, n_out: int) -> float:
    """2·matched / (n_ref + n_out); 1.0 when neither side detects anything."""
    if n_ref + n_out == 0:
        return 1.0
    return 2.0 * matched / (n_ref + n_out)


def found_share(sure_a: list[np.ndarray], loose_b: list[np.ndarray], sure_b: list[np.ndarray],
                loose_a: list[np.ndarray]) -> tuple[int, int]:
    """(found, total) over images: a's sure detections found among b's loose ones, and b's among a's."""
    found = total = 0
    for sa, lb, sb, la in zip(sure_a, loose_b, sure_b, loose_a):
        found += match_detections(sa, lb) + match_detections(sb, la)
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
    CONF and their F1, the hysteresis agreement, and the verdict."""

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


def compare_outputs(refs: list[np.ndarray], outs: list[np.ndarray], precision: str,
                    min_agreement: float = REDUCED_MIN_AGREEMENT, activation_rounding: bool = False) -> Agreement:
    """The Agreement of an export's outputs with PyTorch's; `activation_rounding`: the model rounds activations."""
    diffs = merge_diffs([output_diffs(r, o) for r, o in zip(refs, outs)])
    dets = {(side, c): [d for x in xs for d in detections(x, conf=c)]
            for side, xs in (("ref", refs), ("out", outs)) for c in (CONF, CONF_SURE, CONF_LOOSE)}
    matched = sum(match_detections(a, b) for a, b in zip(dets["ref", CONF], dets["out", CONF]))
    n_ref, n_out = sum(map(len, dets["ref", CONF])), sum(map(len, dets["out", CONF]))
    found, total = found_share(dets["ref", CONF_SURE], dets["out", CONF_LOOSE], dets["out", CONF_SURE],
                               dets["ref", CONF_LOOSE])
    agreement = found / total if total else 1.0
    v = verdict(precision, diffs, agreement, min_agreement, activation_rounding=activation_rounding)
    return Agreement(**diffs, detections_ref=n_ref, detections_out=n_out, detections_matched=matched,
                     det_f1=f1_score(matched, n_ref, n_out), sure_detections=total, sure_found=found,
                     det_agreement=agreement, criterion=v.criterion, passed=v.passed)


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

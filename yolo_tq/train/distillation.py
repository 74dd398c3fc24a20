"""Knowledge distillation from a frozen full-precision teacher, as an Ultralytics loss criterion wrapper.

Pure loss functions on Detect-head outputs (train-mode dicts: "scores" (B, nc, A) logits, "boxes" (B, 4·reg_max, A)
DFL logits, "feats") plus an optional feature loss at chosen layers. Each term is a divergence, so it is exactly
zero when the student reproduces the teacher and positive otherwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def score_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Binary KL divergence between sigmoid class probabilities, summed over classes, weighted per anchor by the
    teacher's top score and normalised by the sum of those weights (the way Ultralytics normalises its cls loss)."""
    t = torch.sigmoid(teacher / temperature)
    s_log, s_log1m = F.logsigmoid(student / temperature), F.logsigmoid(-student / temperature)
    t_log, t_log1m = F.logsigmoid(teacher / temperature), F.logsigmoid(-teacher / temperature)
    kl = t * (t_log - s_log) + (1 - t) * (t_log1m - s_log1m)  # (B, nc, A), >= 0
    weight = t.amax(dim=1, keepdim=True)  # (B, 1, A)
    return (kl * weight).sum() / weight.sum().clamp_min(1e-6) * temperature**2


def box_distillation(student: torch.Tensor, teacher: torch.Tensor, teacher_scores: torch.Tensor, reg_max: int,
                     temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the DFL bin distributions of the 4 box sides, weighted per anchor by the
    teacher's top class probability (boxes of background anchors matter little)."""
    b, _, a = student.shape
    s = F.log_softmax(student.view(b, 4, reg_max, a) / temperature, dim=2)
    t = F.log_softmax(teacher.view(b, 4, reg_max, a) / temperature, dim=2)
    kl = (t.exp() * (t - s)).sum(dim=2).mean(dim=1)  # (B, A)
    weight = torch.sigmoid(teacher_scores).amax(dim=1)  # (B, A)
    return (kl * weight).sum() / weight.sum().clamp_min(1e-6) * temperature**2


def feature_distillation(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of MSE(student, teacher) / mean(teacher²): scale-free feature matching."""
    terms = [F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-6) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean() if terms else torch.zeros(())


class _FeatureTap:
    """Forward hook storing a layer's output (picklable, no closures)."""

    def __init__(self, store: dict, key: int):
        self.store, self.key = store, key

    def __call__(self, module, inputs, output):
        self.store[self.key] = output


class DistillationCriterion:
    """Wraps a model's Ultralytics criterion: detection loss + weighted distillation loss from `teacher`.

    The teacher runs one forward per step under no_grad, in eval mode; it is not an nn.Module attribute of the
    student (plain object), so it is never in the student's parameters, state dict, EMA or checkpoints.
    """

    def __init__(self, base, student: nn.Module, teacher: nn.Module, cls_weight=1.0, box_weight=1.0,
                 feature_weight=0.0, feature_layers=(), temperature=1.0):
        self.base = base
        self.teacher = teacher.eval().requires_grad_(False)
        self.reg_max = student.model[-1].reg_max
        self.weights = (float(cls_weight), float(box_weight), float(feature_weight))
        self.temperature = float(temperature)
        self._s_feats: dict = {}
        self._t_feats: dict = {}
        head = len(student.model) - 1  # the Detect head's output is not a feature map
        self.layers = tuple(i for i in feature_layers if i != head) if feature_weight else ()
        for i in self.layers:
            student.model[i].register_forward_hook(_FeatureTap(self._s_feats, i))
            teacher.model[i].register_forward_hook(_FeatureTap(self._t_feats, i))

    def clear_features(self) -> None:
        """Drop the stored layer outputs (a forward outside the loss, e.g. feature reconstruction, fills them)."""
        self._s_feats.clear(), self._t_feats.clear()

    def __call__(self, preds, batch):
        loss, items = self.base(preds, batch)
        s = preds[1] if isinstance(preds, tuple) else preds
        if not torch.is_grad_enabled():  # validation loss: detection loss only
            return torch.cat([loss, loss.new_zeros(1)]), {**items, "kd_loss": loss.new_zeros(())}
        with torch.no_grad():
            self.teacher.eval()
            t_out = self.teacher(batch["img"])
        t = t_out[1] if isinstance(t_out, tuple) else t_out
        wc, wb, wf = self.weights
        kd = s["scores"].new_zeros(())
        if wc:
            kd = kd + wc * score_distillation(s["scores"], t["scores"].detach(), self.temperature)
        if wb:
            kd = kd + wb * box_distillation(s["boxes"], t["boxes"].detach(), t["scores"].detach(), self.reg_max,
                                            self.temperature)
        if wf and self.layers:
            kd = kd + wf * feature_distillation([self._s_feats[i] for i in self.layers],
                                                [self._t_feats[i].detach() for i in self.layers])
        self.clear_features()
        batch_size = s["scores"].shape[0]
        return torch.cat([loss, (kd * batch_size).reshape(1)]), {**items, "kd_loss": kd.detach()}

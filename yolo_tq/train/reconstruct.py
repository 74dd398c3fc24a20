"""Feature reconstruction before a stage trains (`distill.reconstruct_steps`): the stage's new quantized layers are
fitted, alone, to the FP teacher's outputs of the same layers.

A freshly ternarised early backbone wrecks the features every later layer reads (stage 3 starts at mAP50-95 0.000).
Before the end-to-end training, this runs `steps` optimizer steps on a local loss: the scale-free feature distance
(`distillation.feature_distillation`) between the student's and the teacher's outputs of the layers the stage
quantizes, on the training loader's augmented images (no labels needed; at `distill.reconstruct_imgsz` if set,
through a loader like the trainer's). Only those layers' parameters (latent weights, scales, BatchNorm) move, with
their own Adam; the forward stops after the deepest of them. BatchNorm is in train mode
(unless train.bn_frozen_stats), so its running statistics follow the ternary layers too. The EMA copy then takes
the reconstructed weights.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ultralytics.utils import LOGGER, RANK, TQDM
from ultralytics.utils.torch_utils import unwrap_model

from ..quant.apply import layer_indices
from .distillation import feature_distillation
from .resolution import train_loader_at


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors a layer's output is compared by: a tensor itself; for the Detect head, its raw box and class
    predictions, which training mode returns as a dict and eval mode (the teacher) as (decoded, dict); its "feats"
    are the head's inputs, not its outputs."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        out = out[1]
    if isinstance(out, dict):
        raw = out.get("one2many", out)  # an end-to-end head: its one-to-many branch
        return [raw["boxes"], raw["scores"]]
    raise TypeError(f"cannot reconstruct a layer whose output is a {type(out).__name__}")


def forward_outputs(model: nn.Module, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Outputs of `layers` (model.model indices) as tensors (output_tensors, in layer order), running the
    DetectionModel's layers in order with its routing (`m.f`) and stopping after the deepest one."""
    keep, saved, outputs = set(layers), {}, {}
    for m in model.model[: max(layers) + 1]:
        if m.f != -1:
            x = saved[m.f] if isinstance(m.f, int) else [x if j == -1 else saved[j] for j in m.f]
        x = m(x)
        if m.i in model.save or m.i in keep:
            saved[m.i] = x
        if m.i in keep:
            outputs[m.i] = x
    return [t for i in layers for t in output_tensors(outputs[i])]


def reconstruction_step(student: nn.Module, teacher: nn.Module, layers: list[int], images: torch.Tensor,
                        optimizer: torch.optim.Optimizer) -> float:
    """One optimizer step of the feature distance at `layers`; returns the loss before the step."""
    with torch.no_grad():
        target = forward_outputs(teacher, images, layers)
    loss = feature_distillation(forward_outputs(student, images, layers), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def endless(loader):
    """The loader's batches, epoch after epoch (each pass draws new augmentations)."""
    while True:
        yield from loader


def broadcast_weights(model: nn.Module) -> None:
    """DDP: every rank takes rank 0's reconstructed weights (each rank reconstructed on its own batches)."""
    import torch.distributed as dist

    for t in model.state_dict().values():
        dist.broadcast(t, 0)


def reconstruct_stage(trainer) -> None:
    """Callback (on_pretrain_routine_end, after attach_distillation): `distill.reconstruct_steps` steps of feature
    reconstruction of the stage's layers, then the EMA takes the weights."""
    d = trainer.plan.distill
    model = unwrap_model(trainer.model)
    criterion = model.criterion
    layers = sorted(layer_indices(model, trainer.stage_paths))
    params = [p for i in layers for p in model.model[i].parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=d.reconstruct_lr)
    trainer._model_train()  # train mode as the epochs set it (BatchNorm stays in eval with train.bn_frozen_stats)
    criterion.teacher.eval()
    t0, losses = time.perf_counter(), []
    size = d.reconstruct_imgsz or trainer.args.imgsz
    loader = trainer.train_loader if size == trainer.args.imgsz else train_loader_at(trainer, size)
    batches = endless(loader)  # the loader's own augmentation: every step sees new views
    progress = TQDM(range(d.reconstruct_steps), desc=f"reconstruct {layers} (imgsz {size})", unit="step",
                    unit_scale=False, disable=RANK not in {-1, 0})
    for _ in progress:
        images = trainer.preprocess_batch(next(batches))["img"]
        losses.append(reconstruction_step(model, criterion.teacher, layers, images, optimizer))
        criterion.clear_features()  # its taps on these layers fired too
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    if RANK != -1:
        broadcast_weights(model)
    if trainer.ema is not None:
        trainer.ema.ema.load_state_dict(model.state_dict())
    seconds = time.perf_counter() - t0
    LOGGER.info(f"feature reconstruction of layers {layers}: {d.reconstruct_steps} steps (lr {d.reconstruct_lr}, imgsz "
                f"{size}) in {seconds:.0f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    trainer.reconstruction = {"layers": layers, "steps": d.reconstruct_steps, "imgsz": size, "loss_first": losses[0],
                              "loss_last": losses[-1], "seconds": seconds}

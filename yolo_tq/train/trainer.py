"""TTQTrainer: Ultralytics' DetectionTrainer with quantized layers installed into the model.

Everything else (data pipeline, augmentation, EMA, AMP, warm-up, validation, checkpoints, resume, loggers, plots,
DDP) is Ultralytics' own. The stage's plan travels in `args.ttq` as a plain dict (asdict of a TrainPlan), so it survives
Ultralytics' DDP re-launch, which rebuilds the trainer from `vars(trainer.args)`, and resume, which rebuilds it from
the checkpoint's train_args; it is turned back into typed objects once, in __init__.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..io import AtomicPath, RunFailedError, atomic_write_bytes, load_model, safe_loading, save_stock_checkpoint
from ..plan import TERNARY_EXPORT_NAME, TrainPlan
from ..quant.apply import (export_ternary, install_like, install_stage, quantized_modules, scale_parameters,
                           stage_targets, threshold_parameters)
from .ramp import ramp_shares
from .reconstruct import reconstruct_stage
from .resolution import switch_to_final_imgsz
from .state import find_state_layers, with_training_state

PLAN_KEY = "ttq"  # the trainer argument that carries the plan (asdict of a TrainPlan)


def find_ramp_layers(trainer) -> None:
    """Once, before training: the TTQ weight quantizers of this stage's layers, grouped by yaml layer (early to
    deep), in the model and in its EMA copy (the EMA is what gets validated and saved); and their latent weights in
    the model (frozen in the last ternary_freeze_epochs)."""
    from ..quant.layers import TTQConv2d

    model = unwrap_model(trainer.model)
    paths = [p for p in trainer.stage_paths if isinstance(model.get_submodule(p), TTQConv2d)]
    nets = [model] + ([trainer.ema.ema] if trainer.ema else [])
    groups: dict[int, list] = {}
    for path in paths:
        groups.setdefault(int(path.split(".")[1]), []).extend(net.get_submodule(path).quantizer for net in nets)
    trainer.ramp_groups = [groups[i] for i in sorted(groups)]
    trainer.stage_latents = [model.get_submodule(p).latent_weight for p in paths]
    LOGGER.info(f"ternary ramp '{trainer.plan.ramp.mode}' over {trainer.plan.ramp.epochs} epochs: "
                f"{len(trainer.ramp_groups)} layers")


def set_ramp_shares(trainer) -> None:
    """At each epoch start: the share of ternary weights of every ramped layer (train.ramp.ramp_shares)."""
    plan = trainer.plan.ramp
    shares = ramp_shares(plan, trainer.epoch, len(trainer.ramp_groups))
    for share, quantizers in zip(shares, trainer.ramp_groups):
        for q in quantizers:
            q.share = share
    frozen = plan.freeze_epochs > 0 and trainer.epoch >= trainer.epochs - plan.freeze_epochs
    for latent in trainer.stage_latents:
        latent.requires_grad_(not frozen)


def freeze_to_stage(model: nn.Module, paths: list[str]) -> set[int]:
    """`train.trainable: stage`: every parameter stops training except the latent weights, biases and learned scales
    of the quantized layers this stage names (its TTQ convs; with a C2PSA step, its BitLinear layers, whose LayerNorm
    stays as installed, as the original's did). BatchNorm statistics still follow the data (train mode), as in the
    original. Returns the ids of the frozen parameters."""
    from ..quant.apply import is_quantized

    layers = [m for m in map(model.get_submodule, paths) if is_quantized(m)]
    train = {id(p) for m in layers for p in (m.latent_weight, m.bias, *m.scale_parameters()) if p is not None}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    frozen = {id(p) for p in model.parameters()} - train
    LOGGER.info(f"trainable: stage: {len(train)} parameters of {len(layers)} quantized layers train, {len(frozen)} "
                f"frozen")
    return frozen


def attach_distillation(trainer) -> None:
    """Replace the student's criterion by detection + distillation loss (after the EMA copy is made, so the
    teacher is never copied into the EMA or a checkpoint)."""
    from ..quant.apply import layers_holding_quantized
    from .distillation import DistillationCriterion

    d = trainer.plan.distill
    teacher, _ = load_model(d.teacher)
    model = unwrap_model(trainer.model)
    model.criterion = DistillationCriterion(
        model.init_criterion(), model, teacher.to(trainer.device), cls_weight=d.cls_weight, box_weight=d.box_weight,
        feature_weight=d.feature_weight, feature_layers=sorted(layers_holding_quantized(model)),
        temperature=d.temperature)
    LOGGER.info(f"distillation: teacher {d.teacher} (cls {d.cls_weight}, box {d.box_weight}, "
                f"features {d.feature_weight})")


@contextlib.contextmanager
def atomic_strips():
    """Within: Ultralytics' strip_optimizer, which final_eval uses to rewrite last.pt and best.pt in place, writes a
    temporary file that then replaces the checkpoint through atomic_write_bytes."""
    from ultralytics.engine import trainer as engine

    strip = engine.strip_optimizer

    def atomic_strip(f, s="", updates=None):
        target = Path(s or f)
        tmp = target.with_name(f".{target.name}.strip.tmp")
        try:
            ckpt = strip(f, str(tmp), updates)
            if tmp.is_file():
                atomic_write_bytes(target, tmp.read_bytes())
            return ckpt
        finally:
            tmp.unlink(missing_ok=True)

    engine.strip_optimizer = atomic_strip
    try:
        yield
    finally:
        engine.strip_optimizer = strip


def stop_on_non_finite_loss(trainer) -> None:
    """At the end of an epoch (before its checkpoints are written): a NaN or Inf mean loss ends the stage
    (RunFailedError: exit 1, one line naming the epoch), so the files from before stay the results. Ultralytics' own
    NaN recovery would reload and retry, and its EMA clean-up would write zeros. Once per epoch: the running mean
    `tloss` keeps a NaN of any batch."""
    mean = getattr(trainer, "tloss", None)
    losses = [*(mean.values() if isinstance(mean, dict) else [mean]), getattr(trainer, "loss", None)]
    if any(not torch.isfinite(torch.as_tensor(x).detach()).all() for x in losses if x is not None):
        raise RunFailedError(f"the training loss is not finite in epoch {trainer.epoch + 1}: the stage stopped and "
                             f"wrote nothing new (its last good files are kept); check the learning rates and "
                             f"distill settings")


class TTQTrainer(DetectionTrainer):
    """DetectionTrainer that trains a model with ternary (TTQ / BitLinear) layers.

    Every network parameter keeps training; the learned scales get their own optimizer group (scale_lr,
    scale_weight_decay), and with latent_lr the quantized layers' latent weights get theirs. Checkpoints are written
    atomically (weights folder and last/best paths are AtomicPaths); in safe mode (yolo_tq.io.safe_load_enabled)
    every checkpoint Ultralytics opens for it is loaded weights_only.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        overrides = dict(overrides or {})
        plan = overrides.pop(PLAN_KEY, None)  # not an Ultralytics key: keep it out of their validation
        with safe_loading():  # resume opens last.pt here
            super().__init__(cfg, overrides, _callbacks)
        self.wdir = AtomicPath(self.wdir)
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        if plan is None:  # resume: the plan comes back with the checkpoint's train_args
            plan = getattr(self.args, PLAN_KEY, None)
        if plan is None:
            raise ValueError(f"TTQTrainer needs a '{PLAN_KEY}' plan in its overrides")
        self.plan = TrainPlan(**plan)
        setattr(self.args, PLAN_KEY, asdict(self.plan))  # saved in args.yaml, checkpoints and the DDP state file
        if self.plan.distill is not None:
            self.add_callback("on_pretrain_routine_end", attach_distillation)
            if self.plan.distill.reconstruct_steps and not self.args.resume:
                self.add_callback("on_pretrain_routine_end", reconstruct_stage)
        if self.plan.ramp.acts:
            self.add_callback("on_pretrain_routine_end", find_ramp_layers)
            self.add_callback("on_train_epoch_start", set_ramp_shares)
        if self.plan.final_pass.active:
            self.add_callback("on_train_epoch_start", switch_to_final_imgsz)
        self.add_callback("on_pretrain_routine_end", find_state_layers)  # training state in the metrics (train.state)
        self.add_callback("on_train_epoch_end", stop_on_non_finite_loss)

    def check_resume(self, overrides):
        """Ultralytics' resume; the run stays in the folder it was resumed in (`save_dir`, set by the plan), which the
        args it saves then name too, even when last.pt was written in another folder and moved or copied here."""
        super().check_resume(overrides)
        if self.resume and overrides.get("save_dir"):
            folder = Path(overrides["save_dir"])
            self.args.save_dir, self.args.project, self.args.name = str(folder), str(folder.parent), folder.name

    def train(self):
        with safe_loading():
            return super().train()

    def get_validator(self):
        """Ultralytics' validator re-validates the args it is given, so it gets them without the plan."""
        plan = self.args.__dict__.pop(PLAN_KEY, None)
        try:
            return super().get_validator()
        finally:
            setattr(self.args, PLAN_KEY, plan)

    def get_model(self, cfg=None, weights=None, verbose=True):
        """Fresh model from the yaml; the checkpoint's quantized modules re-installed; its weights loaded;
        then this stage's new layers installed, initialised from the loaded (pretrained) weights."""
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
        if weights is not None:
            install_like(model, weights)
            model.load(weights, verbose=verbose)
        targets = stage_targets(model, self.plan.stage)  # the selection rule, once, as the stage is installed
        self.stage_paths = [path for _, paths in targets for path in paths]
        added = install_stage(model, self.plan.stage, targets)
        if verbose and RANK in {-1, 0}:
            LOGGER.info(f"TTQ stage '{self.plan.stage.name}': {len(added)} modules added, "
                        f"{len(quantized_modules(model))} quantized in total")
        return model

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        net, o = unwrap_model(model), self.plan.optim
        latents = [m.latent_weight for m in quantized_modules(net).values()] if o.latent_lr is not None else []
        frozen = freeze_to_stage(net, self.stage_paths) if self.plan.trainable == "stage" else set()
        groups = [  # (name, parameters, lr, weight decay), each taken out of Ultralytics' groups
            ("ttq_latent", latents, o.latent_lr, decay if o.latent_weight_decay is None else o.latent_weight_decay),
            ("ttq_scales", scale_parameters(net), o.scale_lr, o.scale_weight_decay),
            ("ttq_thresholds", threshold_parameters(net), o.threshold_lr, 0.0)]
        groups = [(g, [p for p in params if id(p) not in frozen], glr, gd) for g, params, glr, gd in groups]
        ids = {id(p) for _, params, _, _ in groups for p in params} | frozen
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for group_name, params, group_lr, group_decay in groups:
            if params:
                optimizer.add_param_group({"params": params, "lr": group_lr, "weight_decay": group_decay,
                                           "param_group": group_name})
                LOGGER.info(f"optimizer: + {len(params)} parameters in '{group_name}' (lr={group_lr}, "
                            f"decay={group_decay})")
        return optimizer

    def _model_train(self):
        """Ultralytics' train mode; with `train.bn_frozen_stats`, every BatchNorm then normalises with (and keeps)
        the running statistics it started from, as detectors are often fine-tuned (its affine still trains)."""
        super()._model_train()
        if self.plan.bn_frozen:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def save_metrics(self, metrics):
        """Ultralytics' results.csv row with this epoch's training state (train.state) as its last columns; the
        loggers read it from self.metrics in on_fit_epoch_end, which follows (with or without validation)."""
        super().save_metrics(with_training_state(self, metrics))

    def validate(self):
        """Ultralytics' validation; with `train.fitness: map50` the fitness (best.pt, early stopping) is mAP50; an
        epoch whose new layers are not yet fully ternary never becomes best.pt."""
        best = self.best_fitness
        metrics, fitness = super().validate()
        if metrics is not None and self.plan.fitness == "map50":
            fitness = float(metrics["metrics/mAP50(B)"])
            self.best_fitness = fitness if best is None or best < fitness else best
        if self.plan.ramp.active and self.epoch < self.plan.ramp.epochs:
            self.best_fitness = best
        return metrics, fitness

    def final_eval(self):
        with atomic_strips():
            super().final_eval()
        if RANK in {-1, 0}:
            self.export_ternary()

    def export_ternary(self) -> Path | None:
        """Write <save_dir>/ternary.pt: the best (else last) weights with TTQ convs as plain three-valued convs."""
        src = self.best if self.best.exists() else self.last
        if not src.exists():
            return None
        model, ckpt = load_model(src)
        out = Path(self.save_dir) / TERNARY_EXPORT_NAME
        save_stock_checkpoint(export_ternary(model), out, train_args=ckpt.get("train_args"),
                              extra={"ternary_source": str(src)})
        LOGGER.info(f"Ternary export saved to {out}")
        return out

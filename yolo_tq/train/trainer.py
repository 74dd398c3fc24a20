"""ShadowTrainer: Ultralytics' DetectionTrainer with quantized layers installed into the model.

Everything else (data pipeline, augmentation, EMA, AMP, warm-up, validation, checkpoints, resume, loggers, plots,
DDP) is Ultralytics' own. The stage plan travels in `args.ttq` (a plain dict), so it survives Ultralytics' DDP
re-launch, which rebuilds the trainer from `vars(trainer.args)`, and resume, which rebuilds it from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..checkpoints import load_model, save_stock_checkpoint
from ..quantization.shadow_weight_manager import LayerPlan, ShadowWeightManager, quantized_modules, scale_parameters

PLAN_KEY = "ttq"
TERNARY_EXPORT_NAME = "ternary.pt"


def make_stage_plan(stage, quant, train_args: dict, distill: dict | None = None) -> dict:
    """The plain-dict plan a trainer needs for one stage (from config dataclasses). `distill`, when given, holds
    the resolved teacher path and the loss weights."""
    return {
        "distill": distill,
        "stage": stage.name,
        "layers": list(stage.layers),
        "include_1x1": bool(stage.include_1x1),
        "detect_head": bool(stage.detect_head),
        "threshold": float(stage.threshold),
        "rule": quant.threshold_rule,
        "scale_grad": quant.scale_grad,
        "per_channel": bool(quant.per_channel),
        "c2psa": stage.c2psa,
        "act_bits": int(quant.act_bits),
        "act_per_token": bool(quant.act_per_token),
        "scale_lr": float(train_args["scale_lr"]),
        "scale_weight_decay": float(train_args["scale_weight_decay"]),
        "latent_lr": None if train_args.get("latent_lr") is None else float(train_args["latent_lr"]),
        "latent_weight_decay": (None if train_args.get("latent_weight_decay") is None
                                else float(train_args["latent_weight_decay"])),
    }


def install_stage(model, plan: dict) -> list[str]:
    """Install what one stage plan adds (TTQ convs, and BitLinear in C2PSA when asked). Returns new paths."""
    manager = ShadowWeightManager(model)
    added = manager.install(
        LayerPlan(tuple(plan.get("layers", ())), plan.get("include_1x1", False), plan.get("threshold", 0.7),
                  plan.get("rule", "mean"), plan.get("scale_grad", "paper"), plan.get("per_channel", False),
                  plan.get("detect_head", False))
    )
    if plan.get("c2psa"):
        from ..quantization.c2psa_replace import replace_c2psa

        added += replace_c2psa(model, plan["c2psa"], threshold=plan.get("threshold", 0.7),
                               act_bits=plan.get("act_bits", 8), per_token=plan.get("act_per_token", True),
                               rule=plan.get("rule", "mean"), scale_grad=plan.get("scale_grad", "paper"))
    return added


def attach_distillation(trainer) -> None:
    """Replace the student's criterion by detection + distillation loss (after the EMA copy is made, so the
    teacher is never copied into the EMA or a checkpoint)."""
    from ..quantization.shadow_weight_manager import plan_layers_in
    from .distillation import DistillationCriterion

    d = trainer.plan["distill"]
    teacher, _ = load_model(d["teacher"])
    model = unwrap_model(trainer.model)
    model.criterion = DistillationCriterion(
        model.init_criterion(), model, teacher.to(trainer.device), cls_weight=d.get("cls_weight", 1.0),
        box_weight=d.get("box_weight", 1.0), feature_weight=d.get("feature_weight", 0.0),
        feature_layers=sorted(plan_layers_in(model)), temperature=d.get("temperature", 1.0))
    LOGGER.info(f"distillation: teacher {d['teacher']} (cls {d.get('cls_weight')}, box {d.get('box_weight')}, "
                f"features {d.get('feature_weight')})")


class ShadowTrainer(DetectionTrainer):
    """DetectionTrainer that trains a model with ternary (TTQ / BitLinear) layers.

    Every network parameter keeps training; the learned scales get their own optimizer group
    (lr = plan['scale_lr'], weight decay = plan['scale_weight_decay']).
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        overrides = dict(overrides or {})
        plan = overrides.pop(PLAN_KEY, None)  # not an Ultralytics key: keep it out of their validation
        super().__init__(cfg, overrides, _callbacks)
        if plan is None:  # resume: the plan comes back with the checkpoint's train_args
            plan = getattr(self.args, PLAN_KEY, None)
        if plan is None:
            raise ValueError(f"ShadowTrainer needs a '{PLAN_KEY}' plan in its overrides")
        self.plan = dict(plan)
        setattr(self.args, PLAN_KEY, self.plan)  # saved in args.yaml, checkpoints and the DDP state file
        if (self.plan.get("distill") or {}).get("teacher"):
            self.add_callback("on_pretrain_routine_end", attach_distillation)

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
            ShadowWeightManager(model).replicate_from(weights)
            model.load(weights, verbose=verbose)
        added = install_stage(model, self.plan)
        if verbose and RANK in {-1, 0}:
            q = ShadowWeightManager(model).quantized
            LOGGER.info(f"TTQ stage '{self.plan.get('stage')}': {len(added)} modules added, {len(q)} quantized in total")
        return model

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        net = unwrap_model(model)
        scales = scale_parameters(net)
        latents = [m.latent_weight for m in quantized_modules(net).values() if hasattr(m, "latent_weight")]
        latents = latents if self.plan.get("latent_lr") is not None else []
        ids = {id(p) for p in scales + latents}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        if latents:
            latent_decay = decay if self.plan.get("latent_weight_decay") is None else self.plan["latent_weight_decay"]
            optimizer.add_param_group({"params": latents, "lr": self.plan["latent_lr"], "weight_decay": latent_decay,
                                       "param_group": "ttq_latent"})
            LOGGER.info(f"optimizer: + {len(latents)} latent weights of quantized layers (lr={self.plan['latent_lr']}, "
                        f"decay={latent_decay})")
        if scales:
            optimizer.add_param_group({"params": scales, "lr": self.plan.get("scale_lr", lr),
                                       "weight_decay": self.plan.get("scale_weight_decay", 0.0),
                                       "param_group": "ttq_scales"})
            LOGGER.info(f"optimizer: + {len(scales)} ternary scales (lr={self.plan.get('scale_lr', lr)}, "
                        f"decay={self.plan.get('scale_weight_decay', 0.0)})")
        return optimizer

    def final_eval(self):
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
        save_stock_checkpoint(ShadowWeightManager(model).export_ternary(), out,
                              train_args=ckpt.get("train_args"), extra={"ternary_source": str(src)})
        LOGGER.info(f"Ternary export saved to {out}")
        return out

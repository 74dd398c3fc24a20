"""The original recipe as configuration (configs/original/*.yaml): its switches (train.trainable, train.fitness, the
clipped scale gradient), the original code's configuration layout, and our defaults left as they were."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import yaml

from conftest import REPO, assert_one_line_error, run_here
from yolo_tq.config import ConfigError, load_config, stage_plan, stage_train_args
from yolo_tq.quant.apply import c2psa_convs, quantized_modules, select_convs
from yolo_tq.quant.ternary import TTQTernarize, ttq_scale_grads
from yolo_tq.train.preflight import train_plan
from yolo_tq.train.stages import train_stages
from yolo_tq.plan import OptimPlan, TrainPlan
from yolo_tq.train.trainer import TTQTrainer

ORIGINAL = REPO / "configs" / "original"
OURS = REPO / "configs"
STAGE1 = [17, 19, 20, 22]


# ------------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name, c2psa", [("stage1_progressive.yaml", None), ("stage2_c2psa.yaml", "bitlinear_ttq"),
                                         ("stage2_c2psa_standard.yaml", "bitlinear_standard")])
def test_original_configs_hold_the_original_recipe(name, c2psa):
    cfg = load_config(ORIGINAL / name)
    t = stage_train_args(cfg, cfg.stages[0])
    assert (t["trainable"], t["fitness"], t["patience"]) == ("stage", "map50", 4)
    assert (t["optimizer"], t["lr0"], t["weight_decay"]) == ("Adam", 1e-4, 5e-4)
    assert (t["scale_lr"], t["scale_weight_decay"], t["latent_lr"]) == (2e-5, 0.005, None)
    assert (t["warmup_epochs"], t["lrf"], t["amp"], t["ultralytics"]) == (0, 1.0, False, {"close_mosaic": 0})
    assert cfg.quantization.scale_grad == "normalized" and not cfg.distill.enabled
    assert [s.c2psa for s in cfg.stages] == [c2psa] * len(cfg.stages)
    ours = load_config(OURS / name)  # the same stage plan, batch and image size as our config of the same name
    assert [(s.layers, s.include_1x1, s.threshold, s.train.get("epochs")) for s in cfg.stages] == \
        [(s.layers, s.include_1x1, s.threshold, s.train.get("epochs")) for s in ours.stages]
    assert (t["batch"], t["imgsz"]) == (ours.train.batch, ours.train.imgsz) == (8, 640)


@pytest.mark.parametrize("name, trainable", [("stage1_progressive.yaml", "all"), ("ttq_wide.yaml", "all"),
                                             ("stage2_c2psa.yaml", "stage"), ("stage2_c2psa_standard.yaml", "stage")])
def test_our_configs_trainable_choice_and_ultralytics_fitness(name, trainable):
    """TTQ stages train every parameter; the C2PSA steps only their BitLinear layers (measured: benchmarks/README.md)."""
    cfg = load_config(OURS / name)
    for stage in cfg.stages:
        t = stage_train_args(cfg, stage)
        assert (t["trainable"], t["fitness"]) == (trainable, "default")


def test_plan_carries_the_switches_and_older_plans_read_as_before(tiny_fp_checkpoint):
    cfg = load_config(ORIGINAL / "stage1_progressive.yaml", {"weights": str(tiny_fp_checkpoint)})
    plan = train_plan(cfg, 0, str(tiny_fp_checkpoint))
    assert (plan.trainable, plan.fitness) == ("stage", "map50")
    assert TrainPlan(**asdict(plan)) == plan
    old = asdict(plan)
    del old["trainable"], old["fitness"]  # a plan saved before the switches existed (resume of an older last.pt)
    assert (TrainPlan(**old).trainable, TrainPlan(**old).fitness) == ("all", "default")


@pytest.mark.parametrize("item, needle", [("train.trainable=frozen", "trainable must be one of all, stage"),
                                          ("train.fitness=map75", "fitness must be one of default, map50")])
def test_unknown_switch_values_are_refused(item, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(ORIGINAL / "stage1_progressive.yaml", None, [item])


# ------------------------------------------------------------------------------------- the clipped scale gradient
def test_normalized_scale_gradient_is_the_originals_clipped_mean():
    """The original: dL/dWp = clip(mean_{w>Δ} g / |Wp|, ±1), dL/dWn = clip(mean_{w<-Δ} (-g) / |Wn|, ±1).
    mean|w| = 1.85/6, Δ = 0.7·mean|w| ≈ 0.216: the positive set is {0.5, 0.3}, the negative {-0.4, -0.6}."""
    w = torch.tensor([0.5, -0.4, 0.05, 0.3, -0.6, 0.0])
    g = torch.tensor([0.02, 0.9, 5.0, 0.04, 0.3, -1.0])
    wp, wn = torch.tensor(0.1), torch.tensor(0.2)
    delta = 0.7 * w.abs().mean()
    pos, neg = w > delta, w < -delta
    gp, gn = ttq_scale_grads(g, pos, neg, wp, wn, "normalized")
    assert gp.item() == pytest.approx(0.3)  # mean(0.02, 0.04) / 0.1: inside the clip
    assert gn.item() == pytest.approx(-1.0)  # -mean(0.9, 0.3) / 0.2 = -3.0, clipped
    paper = ttq_scale_grads(g, pos, neg, wp, wn, "paper")  # the paper's sums are unchanged
    assert [x.item() for x in paper] == pytest.approx([0.06, -1.2])
    wp_, wn_ = wp.clone().requires_grad_(), wn.clone().requires_grad_()
    TTQTernarize.apply(w, wp_, wn_, delta, "normalized").backward(g)
    assert (wp_.grad.item(), wn_.grad.item()) == pytest.approx((0.3, -1.0))


# ------------------------------------------------------------------------------------------ train.trainable: stage
def tiny_original_config(tmp_path, weights, data):
    """The original recipe on the tiny dataset: stage 1 (TTQ), then a C2PSA BitLinear_TTQ stage."""
    doc = yaml.safe_load((ORIGINAL / "stage1_progressive.yaml").read_text())
    doc["base"] = {"checkpoint_dir": str(tmp_path / "ckpt"), "weights": str(weights), "data": str(data)}
    doc["train"].update(epochs=1, batch=4, imgsz=64, workers=0, device="cpu", plots=False, lr0=0.01, scale_lr=0.01,
                        ultralytics={"nbs": 4, "mosaic": 0.0, "close_mosaic": 0})
    doc["stages"] = [{"name": "stage1", "layers": STAGE1, "include_1x1": True, "threshold": 0.715},
                     {"name": "c2psa", "layers": [], "threshold": 0.7, "c2psa": "bitlinear_ttq"}]
    path = tmp_path / "original_tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path)


def trained_parameters(model, paths):
    """Latent weights, biases and learned scales of the quantized modules at `paths`."""
    mods = [model.get_submodule(p) for p in paths]
    return {id(p) for m in mods for p in (m.latent_weight, m.bias, *m.scale_parameters()) if p is not None}


class Stop(Exception):
    pass


def test_trainable_stage_trains_only_the_stage_layers(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = tiny_original_config(tmp_path, tiny_fp_checkpoint, tiny_data)
    seen = {}

    def start(tr):
        seen["grad"] = {id(p) for p in tr.model.parameters() if p.requires_grad}
        seen["optim"] = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
        seen["before"] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        seen["stage"] = trained_parameters(tr.model, select_convs(tr.model, STAGE1, True))

    def end(tr):
        seen["after"] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        seen["names"] = {n: id(p) for n, p in tr.model.named_parameters()}

    train_stages(cfg, [1], callbacks={"on_pretrain_routine_end": start, "on_train_end": end})
    assert seen["grad"] == seen["optim"] == seen["stage"] and seen["stage"]
    changed = {seen["names"][n] for n, p in seen["after"].items() if not torch.equal(p, seen["before"][n])}
    assert changed and changed <= seen["stage"]  # every frozen parameter kept its value; the stage's moved

    def c2psa_start(tr):  # the C2PSA stage from stage 1's output: stage 1's TTQ layers are frozen now
        q = quantized_modules(tr.model)
        stage1 = list(select_convs(tr.model, STAGE1, True))
        assert all(type(q[p]).__name__ == "TTQConv2d" for p in stage1)
        bit = trained_parameters(tr.model, c2psa_convs(tr.model))
        grad = {id(p) for p in tr.model.parameters() if p.requires_grad}
        assert grad == bit == {id(p) for g in tr.optimizer.param_groups for p in g["params"]} and bit
        assert not grad & trained_parameters(tr.model, stage1)
        assert not any(q[p].norm.weight.requires_grad for p in c2psa_convs(tr.model))  # LayerNorm as installed
        raise Stop

    with pytest.raises(Stop):
        train_stages(cfg, [2], callbacks={"on_pretrain_routine_end": c2psa_start})


# --------------------------------------------------------------------------------------------- train.fitness
def validating_trainer(fitness: str, results: list[dict]):
    """A TTQTrainer with only what its validate() reads; its validator returns `results` in turn."""
    tr = TTQTrainer.__new__(TTQTrainer)
    cfg = load_config(ORIGINAL / "stage1_progressive.yaml")
    tr.plan = TrainPlan(stage_plan(cfg, cfg.stages[0]), OptimPlan(1e-4, 0.0), fitness=fitness)
    tr.best_fitness, tr.ema, tr.world_size, tr.epoch, tr.loss = None, None, 1, 0, torch.tensor(0.0)
    queue = iter(results)
    tr.validator = lambda _: dict(next(queue))
    return tr


def test_fitness_map50_drives_best_and_early_stopping():
    """mAP50 falls while Ultralytics' fitness (mAP50-95) rises: map50 keeps the first epoch as best and stops after
    `patience` epochs without a better mAP50; default follows Ultralytics' fitness."""
    from ultralytics.utils.torch_utils import EarlyStopping

    results = [{"metrics/mAP50(B)": 0.5 - 0.05 * i, "metrics/mAP50-95(B)": 0.2 + 0.01 * i, "fitness": 0.2 + 0.01 * i}
               for i in range(6)]
    for mode, best, stops_at in (("map50", 0.5, 5), ("default", 0.25, None)):
        tr, stopper = validating_trainer(mode, results), EarlyStopping(patience=4)
        stopped = None
        for epoch in range(6):
            metrics, fitness = tr.validate()
            assert "fitness" not in metrics
            assert fitness == pytest.approx(results[epoch]["metrics/mAP50(B)" if mode == "map50" else "fitness"])
            if stopper(epoch + 1, fitness) and stopped is None:
                stopped = epoch + 1
        assert tr.best_fitness == pytest.approx(best) and stopped == stops_at


# ------------------------------------------------------------------------------ the original code's config layout
ORIGINAL_LAYOUT = {
    "model_size": "n",
    "base": {"checkpoint_dir": "ttq_checkpoints", "wandb_project": "p", "wandb_entity": None},
    "stages": {
        "stage1": {"name": "shallow", "description": "d", "model": {"weights": "yolo11${model_size}.pt"},
                   "quantization": {"threshold": 0.715, "quantize_first_layer": False, "quantize_1x1_conv": True,
                                    "target_layers": STAGE1},
                   "train": {"epochs": 100, "batch": 8, "lr0": 0.0001, "patience": 4, "device": "cpu",
                             "mosaic": 0.5, "use_magic": True},
                   "val": {"batch": 16, "imgsz": 640}, "logging": {"name": "s1", "use_wandb": False}},
        "stage2": {"model": {"weights": "${base.checkpoint_dir}/yolo11${model_size}/stage1/best.pt"},
                   "quantization": {"threshold": 0.7, "target_layers": [7, 8, 9, 13, 16]},
                   "train": {"epochs": 200}}},
    "data": {"train": "coco128.yaml", "val": "coco128.yaml"},
}
IGNORED = {"base.wandb_project", "base.wandb_entity", "stages.stage1.name", "stages.stage1.description",
           "stages.stage1.quantization.quantize_first_layer", "stages.stage1.train.use_magic", "stages.stage1.val",
           "stages.stage1.logging", "stages.stage2.model.weights"}


def test_original_layout_is_read_with_one_note_per_ignored_key(tmp_path, capsys):
    path = tmp_path / "original_layout.yaml"
    path.write_text(yaml.safe_dump(ORIGINAL_LAYOUT, sort_keys=False))
    cfg = load_config(path)
    assert [(s.name, s.layers, s.include_1x1, s.threshold) for s in cfg.stages] == \
        [("stage1", STAGE1, True, 0.715), ("stage2", [7, 8, 9, 13, 16], False, 0.7)]
    assert (cfg.base.checkpoint_dir, cfg.base.weights, cfg.base.data) == ("ttq_checkpoints", "yolo11n.pt",
                                                                          "coco128.yaml")
    t1, t2 = stage_train_args(cfg, cfg.stages[0]), stage_train_args(cfg, cfg.stages[1])
    assert (t1["epochs"], t1["patience"], t1["device"], t1["ultralytics"]["mosaic"], t2["epochs"]) == \
        (100, 4, "cpu", 0.5, 200)
    assert (t2["trainable"], t2["fitness"], t2["scale_lr"]) == ("stage", "map50", 2e-5)  # the original recipe's
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note:")]
    ignored = [x for x in notes if "' ignored: " in x]
    assert len(notes) == len(ignored) + 1  # plus the one line that names the layout and the recipe it reads onto
    assert sorted(x.split("'")[1] for x in ignored) == sorted(IGNORED)  # one line each; data.val = data.train: none


def test_original_layout_reaches_the_commands(tmp_path):
    path = tmp_path / "original_layout.yaml"
    path.write_text(yaml.safe_dump(ORIGINAL_LAYOUT, sort_keys=False))
    r = run_here("train.py", "--config", path, "--stage", "3")
    assert_one_line_error(r, "stage 3 does not exist", "stages 1..2")
    assert sum(x.startswith("note:") for x in r.stderr.splitlines()) == len(IGNORED) + 1


def test_original_c2psa_layout_is_refused_with_how_to_convert(tmp_path, tiny_fp_checkpoint):
    path = tmp_path / "original_c2psa.yaml"
    path.write_text(yaml.safe_dump({"stage": "2_baseline_c2psa", "model": {"weights": "yolo11n.pt"},
                                    "quantization": {"technique": "bitlinear_ttq_c2psa", "threshold": 0.7},
                                    "train": {"epochs": 50}}))
    r = run_here("train_c2psa.py", "--config", path, "--model", tiny_fp_checkpoint)
    assert_one_line_error(r, "original code's C2PSA layout", "configs/original/stage2_c2psa.yaml", "--set")
    with pytest.raises(ConfigError):
        load_config(path)


def test_our_layout_is_read_as_it_was(capsys):
    """A list of stages is not converted: no note, no setting taken from configs/original."""
    cfg = load_config(OURS / "stage1_progressive.yaml")
    assert cfg.base.checkpoint_dir == "checkpoints" and cfg.train.scale_lr == 1e-4 and cfg.distill.enabled
    assert "note:" not in capsys.readouterr().err

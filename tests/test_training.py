"""End-to-end training mechanics on a tiny generated dataset (no ../shared needed): cumulative stages, export,
loss falls, resume, and the DDP re-launch path."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import StopTraining, train_first_epoch_only
from yolo_tq.config import load_config, stage_outputs
from yolo_tq.io import load_model
from yolo_tq.quant.apply import quantized_modules, select_convs
from yolo_tq.quant.layers import TTQConv2d
from yolo_tq.quant.ternary import ternary_values
from yolo_tq.train.preflight import plan_stages
from yolo_tq.train.stages import train_stages
from yolo_tq.train.trainer import PLAN_KEY, TTQTrainer

STAGE1, STAGE2 = (17, 19, 20, 22), (7, 8, 9, 13, 16)


def write_config(tmp: Path, weights: Path, data: Path, epochs: int = 2) -> Path:
    cfg = tmp / "tiny_stages.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model_size: n
        base: {{checkpoint_dir: {tmp / 'ckpt'}, weights: {weights}, data: {data}}}
        train:
          epochs: {epochs}
          batch: 4
          imgsz: 64
          lr0: 0.002
          scale_lr: 0.002
          warmup_epochs: 0
          workers: 0
          device: cpu
          plots: false
          ultralytics: {{nbs: 4, mosaic: 0.0, close_mosaic: 0}}
        stages:
          - {{name: stage1, layers: {list(STAGE1)}, include_1x1: true, threshold: 0.715}}
          - {{name: stage2, layers: {list(STAGE2)}, include_1x1: false, threshold: 0.715, train: {{epochs: 1}}}}
        """))
    return cfg


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory, tiny_fp_checkpoint, tiny_data):
    tmp = tmp_path_factory.mktemp("stages")
    cfg = load_config(write_config(tmp, tiny_fp_checkpoint, tiny_data, epochs=6))
    losses = []
    train_stages(cfg, [1], callbacks={"on_train_epoch_end": lambda tr: losses.append(float(sum(v.sum() for v in tr.tloss.values())))})
    stage1_model, _ = load_model(stage_outputs(cfg, cfg.stages[0]).best)
    train_stages(cfg, [2])
    return cfg, losses, stage1_model


def test_loss_falls(two_stages):
    _, losses, _ = two_stages
    assert len(losses) == 6
    assert losses[-1] < 0.9 * losses[0], losses


def test_stage2_keeps_stage1_layers_ternary_and_carries_latents(two_stages):
    cfg, _, stage1_model = two_stages
    out2 = stage_outputs(cfg, cfg.stages[1])
    stage2_model, _ = load_model(out2.best)
    q1, q2 = quantized_modules(stage1_model), quantized_modules(stage2_model)
    expected1 = set(select_convs(stage1_model, STAGE1, True))
    expected2 = set(select_convs(stage2_model, STAGE2, False))
    assert set(q1) == expected1
    assert set(q2) == expected1 | expected2
    for path in expected1:
        assert isinstance(q2[path], TTQConv2d)
        assert ternary_values(q2[path].weight) is not None
        # latent weights are full precision (many values), carried over and still trained in stage 2
        assert torch.unique(q2[path].latent_weight).numel() > 3
    moved = sum(not torch.equal(q1[p].latent_weight, q2[p].latent_weight) for p in expected1)
    assert moved == len(expected1)


def test_stage2_start_loads_stage1_latents_exactly(two_stages):
    cfg, _, stage1_model = two_stages
    over = plan_stages(cfg, [2], str(stage_outputs(cfg, cfg.stages[0]).best))[0].trainer_overrides(PLAN_KEY)
    over["name"] = "probe"
    trainer = TTQTrainer(overrides=over)
    model = trainer.get_model(cfg=stage1_model.yaml, weights=stage1_model, verbose=False)
    q1, q = quantized_modules(stage1_model), quantized_modules(model)
    for path, m in q1.items():
        assert torch.equal(q[path].latent_weight, m.latent_weight)
        assert torch.equal(q[path].quantizer.wp, m.quantizer.wp) and torch.equal(q[path].quantizer.wn, m.quantizer.wn)


def test_ternary_export_is_stock_and_matches_training_model(two_stages, tmp_path):
    cfg, _, _ = two_stages
    out = stage_outputs(cfg, cfg.stages[1])
    assert out.ternary.is_file()
    trained, _ = load_model(out.best)
    x = torch.rand(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        ref = trained(x)[0]
    torch.save(ref, tmp_path / "ref.pt")
    # a fresh interpreter in which this package cannot be imported: only torch and ultralytics
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["yolo_tq"] = None  # any import of this package (or unpickling one of its classes) fails
        from ultralytics import YOLO
        m = YOLO({str(out.ternary)!r})
        net = m.model.float().eval()
        convs = [mod for mod in net.modules() if isinstance(mod, torch.nn.Conv2d)]
        assert all(type(mod) is torch.nn.Conv2d for mod in convs)
        n3 = sum(torch.unique(mod.weight).numel() <= 3 for mod in convs)
        with torch.no_grad():
            y = net(torch.load({str(tmp_path / 'x.pt')!r}))[0]
        d = (y - torch.load({str(tmp_path / 'ref.pt')!r})).abs().max().item()
        r = m.predict(torch.load({str(tmp_path / 'x.pt')!r}), verbose=False)
        print("RESULT", n3, d, len(r))
        """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    _, n3, diff, npred = res.stdout.strip().splitlines()[-1].split()
    assert int(n3) == len(select_convs(trained, STAGE1, True)) + len(select_convs(trained, STAGE2, False))
    assert float(diff) < 1e-4
    assert int(npred) == 1


def test_resume_restores_latents_scales_ema_and_optimizer(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = load_config(write_config(tmp_path, tiny_fp_checkpoint, tiny_data, epochs=3))
    train_first_epoch_only(cfg)
    last = stage_outputs(cfg, cfg.stages[0]).last
    saved = torch.load(last, weights_only=False)
    assert saved["epoch"] == 0
    seen = {}

    def capture(trainer):
        seen["epoch"] = trainer.start_epoch
        seen["model"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        seen["ema"] = {k: v.clone() for k, v in trainer.ema.ema.state_dict().items()}
        seen["opt"] = trainer.optimizer.state_dict()
        raise StopTraining

    with pytest.raises(StopTraining):
        train_stages(cfg, [1], resume=True, callbacks={"on_pretrain_routine_end": capture})
    assert seen["epoch"] == 1
    ema_saved = saved["ema"].float().state_dict()
    assert any(k.endswith("latent_weight") for k in ema_saved) and any(k.endswith(".quantizer.wp") for k in ema_saved)
    for k, v in ema_saved.items():
        assert torch.equal(seen["ema"][k], v), k
        assert torch.equal(seen["model"][k], v), k  # Ultralytics resumes the weights from the EMA
    opt_saved = saved["optimizer"]
    assert [g["lr"] for g in seen["opt"]["param_groups"]] == [g["lr"] for g in opt_saved["param_groups"]]
    assert seen["opt"]["param_groups"][-1]["param_group"] == "ttq_scales"
    for pid, st in opt_saved["state"].items():
        for name, t in st.items():
            if torch.is_tensor(t):
                assert torch.equal(seen["opt"]["state"][pid][name].to(t.dtype), t), (pid, name)
    # and training continues to the end from there
    train_stages(cfg, [1], resume=True)
    out = stage_outputs(cfg, cfg.stages[0])
    assert out.ternary.is_file()
    assert len((out.dir / "results.csv").read_text().strip().splitlines()) == 1 + 3  # header + 3 epochs


def test_ddp_relaunch_rebuilds_same_plan(tmp_path, tiny_fp_checkpoint, tiny_data):
    """Ultralytics' DDP workers rebuild the trainer from generate_ddp_file's state, not from our objects."""
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.dist import generate_ddp_file
    from ultralytics.utils.patches import torch_load

    cfg = load_config(write_config(tmp_path, tiny_fp_checkpoint, tiny_data))
    over = plan_stages(cfg, [1], str(tiny_fp_checkpoint))[0].trainer_overrides(PLAN_KEY)
    parent = TTQTrainer(overrides=over)
    py_file = generate_ddp_file(parent)
    try:
        text = Path(py_file).read_text()
        assert 'state["trainer"](cfg=cfg, overrides=state["args"]' in text  # the worker code we emulate below
        state = torch_load(str(Path(py_file).with_suffix(".pt")), map_location="cpu")
        worker_cfg = DEFAULT_CFG_DICT.copy()
        worker_cfg.update(save_dir="")
        worker = state["trainer"](cfg=worker_cfg, overrides=state["args"], _callbacks=state["callbacks"])
        worker.model = state["model"]
        assert type(worker) is TTQTrainer and worker.plan == parent.plan
        worker.setup_model()
        parent.setup_model()
        assert set(quantized_modules(worker.model)) == set(quantized_modules(parent.model))
        assert set(quantized_modules(worker.model)) == set(select_convs(worker.model, STAGE1, True))
    finally:
        for p in (Path(py_file), Path(py_file).with_suffix(".pt")):
            p.unlink(missing_ok=True)


def test_optimizer_groups_for_latents_and_scales(tmp_path, tiny_fp_checkpoint, tiny_data):
    """latent_lr / latent_weight_decay / scale_lr / threshold_lr each reach exactly their parameters, and nothing is in
    two groups."""
    cfg = load_config(write_config(tmp_path, tiny_fp_checkpoint, tiny_data, epochs=1), None,
                      ["train.latent_lr=0.01", "train.latent_weight_decay=0.0", "train.scale_lr=0.003",
                       "quantization.learn_threshold=true", "train.threshold_lr=0.02"])

    class Stop(Exception):
        pass

    seen = {}

    def capture(trainer):
        seen["groups"] = {g.get("param_group", i): g for i, g in enumerate(trainer.optimizer.param_groups)}
        seen["model"] = trainer.model
        raise Stop

    with pytest.raises(Stop):
        train_stages(cfg, [1], callbacks={"on_pretrain_routine_end": capture})
    groups, model = seen["groups"], seen["model"]
    q = quantized_modules(model)
    latent, scales = groups["ttq_latent"], groups["ttq_scales"]
    assert latent["initial_lr"] == 0.01 and latent["weight_decay"] == 0.0 and scales["initial_lr"] == 0.003
    assert {id(p) for p in latent["params"]} == {id(m.latent_weight) for m in q.values()}
    assert {id(p) for p in scales["params"]} == {id(p) for m in q.values() for p in m.scale_parameters()}
    thresholds = groups["ttq_thresholds"]
    assert thresholds["initial_lr"] == 0.02 and thresholds["weight_decay"] == 0.0
    assert {id(p) for p in thresholds["params"]} == {id(m.quantizer.threshold_factor) for m in q.values()}
    assert not {id(p) for p in scales["params"]} & {id(p) for p in thresholds["params"]}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter in two groups
    assert {id(p) for p in model.parameters() if p.requires_grad} <= set(ids) <= {id(p) for p in model.parameters()}

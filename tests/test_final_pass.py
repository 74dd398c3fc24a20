"""The final pass at the deployment size (train.final_imgsz / final_epochs): which epochs, the batches really change
size, mosaic stays closed, bad values are refused."""

import textwrap

import pytest

from yolo_tq.config import ConfigError, load_config
from yolo_tq.train.resolution import in_final_pass
from yolo_tq.train.stages import train_stages


def test_in_final_pass_takes_the_last_epochs():
    assert [in_final_pass(e, 10, 2) for e in range(10)] == [False] * 8 + [True] * 2
    assert not any(in_final_pass(e, 10, 0) for e in range(10))


def mosaic_probability(transform) -> float:
    """p of the Mosaic inside a (nested) Ultralytics Compose; 0 if there is none."""
    if type(transform).__name__ == "Mosaic":
        return float(transform.p)
    return max((mosaic_probability(t) for t in getattr(transform, "transforms", [])), default=0.0)


def _config(tmp_path, weights, data) -> str:
    path = tmp_path / "final.yaml"
    path.write_text(textwrap.dedent(f"""
        base: {{checkpoint_dir: {tmp_path / 'ckpt'}, weights: {weights}, data: {data}}}
        train: {{epochs: 3, batch: 4, imgsz: 64, workers: 0, device: cpu, plots: false, warmup_epochs: 0,
                 val: false, final_imgsz: 96, final_epochs: 1, ultralytics: {{nbs: 4, close_mosaic: 3}}}}
        distill: {{enabled: false}}
        stages:
          - {{name: s3, layers: [2, 3], include_1x1: false, threshold: 0.7}}
        """))
    return str(path)


def test_last_epoch_trains_at_the_final_size(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data))
    sizes, mosaic, state = {}, {}, {}

    def input_size(module, inputs):
        if module.training:
            sizes.setdefault(state["trainer"].epoch, set()).add(tuple(inputs[0].shape[-2:]))

    def tap(trainer):
        state["trainer"] = trainer
        trainer.model.model[0].register_forward_pre_hook(input_size)

    def record_mosaic(trainer):
        mosaic[trainer.epoch] = mosaic_probability(trainer.train_loader.dataset.transforms)

    train_stages(cfg, [1], callbacks={"on_train_start": tap, "on_train_epoch_end": record_mosaic})
    assert sizes[0] == sizes[1] == {(64, 64)} and sizes[2] == {(96, 96)}
    assert mosaic == {0: 0.0, 1: 0.0, 2: 0.0}  # close_mosaic 3: closed throughout, the new loader too


@pytest.mark.parametrize("bad, match", [("train.final_imgsz=100", "final_imgsz"), ("train.final_epochs=-1",
                                                                                   "final_epochs")])
def test_bad_final_pass_values_are_refused(tmp_path, tiny_fp_checkpoint, tiny_data, bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data), None, [bad])


def test_final_pass_must_leave_earlier_epochs(tmp_path, tiny_fp_checkpoint, tiny_data):
    cfg = load_config(_config(tmp_path, tiny_fp_checkpoint, tiny_data), None, ["train.final_epochs=3"])
    with pytest.raises(ConfigError, match="final_epochs"):
        train_stages(cfg, [1])

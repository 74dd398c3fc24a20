"""BatchNorm re-estimation: statistics equal the hand-computed averages; mode and momentum restored."""

import pytest
import torch
import torch.nn as nn

from yolo_tq.train.batchnorm import recalibrate_batchnorm


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=0.03), nn.ReLU())
    net[1].running_mean.fill_(5.0)  # stale statistics, as after ternarising the conv
    net[1].running_var.fill_(9.0)
    return net.eval()


def test_statistics_are_the_average_over_batches():
    net = _net()
    batches = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8) * 3 + 1]
    seen = recalibrate_batchnorm(net, iter(batches))
    assert seen == 4
    with torch.no_grad():
        outs = [net[0](x) for x in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)


def test_restores_mode_momentum_and_takes_no_gradients():
    net = _net()
    recalibrate_batchnorm(net, [torch.randn(2, 3, 8, 8)])
    assert not net.training and net[1].momentum == 0.03
    assert all(p.grad is None for p in net.parameters())
    net.train()
    recalibrate_batchnorm(net, [torch.randn(2, 3, 8, 8)])
    assert net.training


def test_max_images_cuts_the_stream():
    net = _net()
    seen = recalibrate_batchnorm(net, (torch.randn(4, 3, 8, 8) for _ in range(10)), max_images=6)
    assert seen == 6


def test_empty_source_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(_net(), [])


def test_post_training_ternary_reestimates_bn_on_train_images(tmp_path, tiny_fp_checkpoint, tiny_data):
    """bn_reestimate_images > 0: same ternary convs, new BN statistics; 0: the checkpoint's statistics kept."""
    from yolo_tq.io import load_model
    from yolo_tq.config import load_config
    from yolo_tq.train.stages import post_training_ternary

    def export(n):
        cfg = load_config("configs/stage1_progressive.yaml", {"data": str(tiny_data), "imgsz": 64, "batch": 4},
                          [f"quantization.bn_reestimate_images={n}"])
        model, _ = load_model(post_training_ternary(cfg, [0], str(tiny_fp_checkpoint), tmp_path / f"ptq{n}.pt"))
        return model.float().state_dict()

    fp, _ = load_model(tiny_fp_checkpoint)
    fp = fp.float().state_dict()
    plain, reest = export(0), export(6)
    bn_keys = [k for k in plain if k.endswith("running_mean")]
    conv_keys = [k for k in plain if k.endswith("conv.weight")]
    assert all(torch.equal(plain[k], fp[k]) for k in bn_keys)
    changed = [k for k in bn_keys if not torch.allclose(reest[k], plain[k])]
    assert len(changed) > len(bn_keys) // 2
    assert all(torch.equal(plain[k], reest[k]) for k in conv_keys)
    assert all(reest[k.replace("running_mean", "num_batches_tracked")] > 0 for k in bn_keys)

"""The method parts shared by NCL, ECL, SSD and SHIKE (train/methods/parts.py), on hand-checked cases."""
import torch
from torch import nn

from train.methods.parts import FeatureQueue, all_gather, ema_update, freeze_batchnorm, projection_mlp, unwrap


def _filled(module: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)
    return module


def test_ema_update_moves_parameters_only_and_composes_as_a_power():
    key, query = _filled(nn.BatchNorm1d(2), 0.0), _filled(nn.BatchNorm1d(2), 1.0)
    key.running_mean.fill_(7.0)
    ema_update(key, query, 0.5)
    assert key.weight.tolist() == [0.5, 0.5] and key.running_mean.tolist() == [7.0, 7.0]  # buffers untouched
    for _ in range(2):
        ema_update(key, query, 0.5)
    once = _filled(nn.BatchNorm1d(2), 0.0)
    ema_update(once, query, 0.5 ** 3)
    assert key.weight.tolist() == once.weight.tolist() == [0.875, 0.875]  # 1 - 0.5^3


def test_feature_queue_wraps_around_and_keeps_labels_per_slot():
    queue = FeatureQueue(slots=2, size=4, dim=2, label_fill=0)
    assert queue.queue.shape == (2, 4, 2) and torch.allclose(queue.queue.norm(dim=2), torch.ones(2, 4))
    assert queue.queue_labels.tolist() == [[0] * 4] * 2
    first, second = torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[0.0, 1.0]] * 3)
    queue.enqueue(1, first, torch.tensor([5, 6, 7]))
    queue.enqueue(1, second, torch.tensor([8, 9, 3]))
    # slot 1: rows 0..2 from the first batch, then row 3 and (wrapping) rows 0, 1 from the second
    assert queue.queue[1].tolist() == [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert queue.queue_labels[1].tolist() == [9, 3, 7, 8] and queue.queue_ptr.tolist() == [0, 2]
    assert queue.queue_labels[0].tolist() == [0] * 4  # the other slot is untouched
    assert "queue_labels" not in dict(FeatureQueue(1, 4, 2).named_buffers())


def test_freeze_batchnorm_stops_only_the_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout()).train()
    freeze_batchnorm(net)
    assert [m.training for m in net] == [True, False, True]
    before = net[1].running_mean.clone()
    net(torch.randn(2, 3, 4, 4)).sum().backward()
    assert torch.equal(net[1].running_mean, before) and net[1].weight.grad is not None


def test_unwrap_projection_and_gather_without_distributed():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    mlp = projection_mlp(8, 3)
    assert unwrap(Wrapper(mlp)) is mlp and unwrap(mlp) is mlp
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear] and mlp(torch.randn(5, 8)).shape == (5, 3)
    x = torch.arange(3.0)
    assert all_gather(x) is x

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from train.config import config_from_args
from train.data.transforms import training_transform
from train.methods.base import balanced_logits
from train.methods.ncl import NCL, hcm_mask, nbod_loss, nil_loss, pairwise_kl
from train.models import ModelSpec, build_model


def test_hcm_keeps_target_even_when_it_scores_lowest():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, -9.0]])
    mask = hcm_mask(logits, torch.tensor([4]), hard_n=2)
    assert mask.tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0]]  # target 4 plus the top class


def test_partial_logits_are_zeroed_not_minus_inf():
    balanced = torch.tensor([[[2.0, 1.0, 3.0]]])  # B=1, K=1, C=3
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    target = torch.tensor([0])
    # partial logits [2, 0, 3]: the masked class still adds e^0 to the denominator
    expected_partial = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(3)))
    expected_full = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(3)))
    assert abs(nil_loss(balanced, mask, target).item() - (expected_full + expected_partial)) < 1e-5


def test_balanced_softmax_is_ce_plus_log_prior():
    z, counts, y = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([100.0, 10.0, 1.0]), 1
    loss = F.cross_entropy(balanced_logits(z, counts.log()), torch.tensor([y]))
    manual = -math.log(counts[y] * math.exp(z[0, y]) / sum(counts[c] * math.exp(z[0, c]) for c in range(3)))
    assert abs(loss.item() - manual) < 1e-6


def _kl(p, q):
    return sum(pi * (math.log(pi + 1e-9) - math.log(qi + 1e-9)) for pi, qi in zip(p, q))


def test_nbod_sums_every_ordered_pair_with_batchmean():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])  # B=1, K=3, C=2
    p = logits.softmax(2)[0].tolist()
    expected = sum(_kl(p[j], p[k]) for k in range(3) for j in range(3) if j != k)
    assert abs(pairwise_kl(logits).item() - expected) < 1e-5
    ones = torch.ones(1, 2)
    assert abs(nbod_loss(logits, ones, 0.6, 0.6).item() - (0.6 + 0.6) * expected / 2) < 1e-5
    # batchmean: duplicating the batch leaves the value unchanged
    assert abs(pairwise_kl(logits.repeat(4, 1, 1)).item() - expected) < 1e-5


def test_nbod_is_not_stop_gradient():
    logits = torch.randn(4, 3, 5, requires_grad=True)
    nbod_loss(logits, torch.ones(4, 5)).backward()
    assert logits.grad.abs().sum() > 0


def test_nbod_gradient_stays_finite_when_probabilities_underflow():
    # logits 200 apart: softmax gives exact zeros, where xlogy(p, p) would have an infinite gradient
    logits = torch.tensor([[[200.0, 0.0, -200.0], [0.0, 200.0, 0.0]]], requires_grad=True)
    loss = nbod_loss(logits, torch.ones(1, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def _ncl_moco(*flags: str):
    """A real NCL method with its MoCo branch on 3 ResNet-8 experts, and a batch of 4 images."""
    cfg = config_from_args(["--ncl-moco", "--moco-queue", "8", "--moco-dim", "4", "--hcm-n", "3", *flags])
    model = build_model(ModelSpec(arch="resnet8", num_classes=5, num_experts=3))
    method = NCL(cfg, model, [10, 8, 6, 4, 2])
    torch.manual_seed(0)
    images = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    return method, model, images, torch.tensor([0, 1, 2, 3])


def _fill(module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


@pytest.mark.parametrize("flags, expected", [((), 1 - 0.5 ** 3), (("--moco-ema-once",), 0.5)])
def test_ncl_ema_runs_once_per_expert_in_the_loss(flags, expected):
    """The official update sits inside the per-expert loop over the whole encoder list: 3 experts, momentum 0.5
    -> key = 0.5^3 * 0 + (1 - 0.5^3) * 1 after one step (--moco-ema-once: 0.5)."""
    method, model, images, targets = _ncl_moco("--moco-momentum", "0.5", *flags)
    _fill(model, 1.0)
    _fill(method.aux.key_encoder, 0.0)
    method.loss(model, images, targets)
    weight = method.aux.key_encoder.experts[2].backbone.conv1.weight
    assert torch.allclose(weight, torch.full_like(weight, expected))
    method.after_step(model)  # the official moment is the loss: nothing more after the optimizer step
    assert method.aux.key_encoder.experts[0].backbone.conv1.weight.flatten()[0].item() == pytest.approx(expected)


def test_ncl_ema_runs_after_the_step_keys_were_computed():
    """With momentum 0 the update copies the query encoder: the queued keys must still be those of the key
    encoder as it was when the step began (the official update follows the key forward)."""
    method, model, images, targets = _ncl_moco("--moco-momentum", "0", "--no-moco-independent-key-init")
    _fill(method.aux.key_encoder, 0.01)
    before = copy.deepcopy(method.aux)
    with torch.no_grad():
        features = before.key_encoder.forward_features(images[1])
        expected = torch.stack([F.normalize(before.key_projection[k](features[:, k]), dim=1) for k in range(3)])
    method.loss(model, images, targets)
    assert torch.allclose(method.aux.queue[:, :4], expected, atol=1e-6)
    key_weight = method.aux.key_encoder.experts[1].backbone.conv1.weight
    assert torch.equal(key_weight, model.experts[1].backbone.conv1.weight)  # and then the (m = 0) update ran


def test_ncl_contrastive_preset_uses_the_official_key_view_and_shot_rule():
    cfg = config_from_args(["--preset", "ncl-cifar100-lt-contrastive"])
    assert (cfg.augment, cfg.key_augment, cfg.moco_ema_once, cfg.moco_ema_before_backward) == ("cifar", "mocov2", False, True)
    spec = ModelSpec()
    query, key = training_transform(cfg.augment, cfg.key_augment, spec, views=2).transforms
    assert query is not key
    crop, jitter, gray, blur, flip = key.transforms[1:6]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (32, 32) and crop.scale == (0.2, 1.0)
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], v2.ColorJitter) and jitter.transforms[0].hue == (-0.1, 0.1)
    assert isinstance(gray, v2.RandomGrayscale) and gray.p == 0.2 and isinstance(flip, v2.RandomHorizontalFlip)
    assert blur.p == 0.5 and list(blur.transforms[0].sigma) == [0.1, 2.0]
    for name in ("ncl-cifar100-lt", "ncl-cifar100-lt-contrastive", "ncl-imagenet-lt", "ncl-synthetic"):
        assert config_from_args(["--preset", name]).shot_rule == "ncl"
    assert training_transform("cifar", "", spec, views=1) is not None
    same = training_transform("cifar", "", spec, views=2).transforms
    assert same[0] is same[1]  # no key augmentation named: a second draw of the query's

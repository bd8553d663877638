import math

import torch
import torch.nn.functional as F

from train.methods.base import balanced_logits
from train.methods.ncl import hcm_mask, nbod_loss, nil_loss, pairwise_kl


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

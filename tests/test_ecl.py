import pytest
import torch

from export.job import job_for
from tests.helpers import TINY_TRAIN
from tests.helpers import export_both_fusions
from train.checkpoint import load_checkpoint
from train.config import config_from_args
from train.engine import train
from train.methods.ecl import class_weights, feature_distillation, peer_mean, weighted_peer_kl


def test_peer_mean_excludes_self_and_is_a_detached_teacher():
    x = torch.tensor([[1.0, 2.0, 6.0]], requires_grad=True)
    assert peer_mean(x).tolist() == [[4.0, 3.5, 1.5]] and not peer_mean(x).requires_grad


def test_class_weights_favour_classes_where_distillation_lags():
    label = torch.tensor([0.8, 0.6, 0.4])
    distill = torch.tensor([0.8, 0.3, 0.1])  # ratio 1, 2, 4
    w = class_weights(label, distill)
    assert w.tolist() == pytest.approx([3 / 7, 6 / 7, 12 / 7]) and w.mean().item() == pytest.approx(1.0)


def test_feature_distillation_is_zero_for_agreeing_experts():
    same = torch.randn(4, 1, 8).repeat(1, 3, 1)
    assert feature_distillation(same).item() == pytest.approx(0.0, abs=1e-6)
    feats = torch.randn(4, 3, 8, requires_grad=True)
    loss = feature_distillation(feats)
    loss.backward()
    assert loss.item() > 0 and feats.grad.abs().sum() > 0


def test_weighted_peer_kl_scales_with_the_sample_weights():
    logits = torch.randn(5, 3, 4)
    ones = weighted_peer_kl(logits, torch.ones(5))
    assert weighted_peer_kl(logits, torch.full((5,), 2.0)).item() == pytest.approx(2 * ones.item(), rel=1e-6)
    assert weighted_peer_kl(torch.zeros(5, 3, 4), torch.ones(5)).item() == pytest.approx(0.0, abs=1e-6)


def test_ecl_trains_with_every_component_and_exports_like_ncl(tmp_path):
    cfg = config_from_args([*TINY_TRAIN, "--method", "ecl", "--epochs", "3", "--ecl-contrastive", "--moco-queue", "64",
                            "--moco-dim", "16", "--out", str(tmp_path / "ecl")])
    data = load_checkpoint(train(cfg))
    assert data["metrics"]["ensemble"]["overall"] > 30  # chance: 10 %
    assert {"distill_heads.0.weight", "label_conf", "moco.queue"} <= set(data["training"]["aux"])
    assert not any("distill" in k for k in data["state_dict"])  # training-only heads are not exported
    export_both_fusions(job_for(tmp_path / "ecl" / "ecl.pt", max_batch=8), tmp_path)


def test_ecl_components_can_be_switched_off(tmp_path):
    cfg = config_from_args([*TINY_TRAIN, "--method", "ecl", "--epochs", "1", "--no-ecl-reweight",
                            "--ecl-feature-weight", "0", "--out", str(tmp_path / "ablation")])
    train(cfg)
    with open(tmp_path / "ablation" / "log.csv") as f:
        header = f.readline()
    assert "train_kd" in header and "train_feature_kd" not in header and "train_con" not in header

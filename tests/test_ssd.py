import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from tests.helpers import convert_cli, export_cli, train_cli
from tests.helpers import ort_logits
from train.checkpoint import load_checkpoint, load_model
from train.config import config_from_args
from train.data.transforms import training_transform
from train.methods.ssd import SSD, ClassAwareSampler, distillation, masked_info_nce, ssd_stages
from train.models import ModelSpec, build_model
from train.schedule import lr_factor
from train.models.heads import LWSHead

SSD_TINY = ["--method", "ssd", "--dataset", "synthetic", "--arch", "resnet8", "--synthetic-max", "120", "--imb-factor",
            "20", "--synthetic-test", "30", "--batch-size", "32", "--lr", "0.05", "--schedule", "cosine",
            "--warmup-epochs", "0", "--moco-queue", "64", "--moco-dim", "16"]


def test_stage_schedules_follow_the_official_0_indexed_cosine():
    """lr * (1 + cos(pi * e / E)) / 2 from e = 0: every stage starts at its peak and no epoch runs at 0."""
    cfg = config_from_args(["--preset", "ssd-imagenet-lt", "--ssd-lws-epochs", "1"])
    ssfl, slg, sdl, lws = ssd_stages(cfg)
    assert [s.name for s in (ssfl, slg, sdl, lws)] == ["ssfl", "slg", "sdl", "lws"]
    assert [round(lr_factor(slg, e), 4) for e in range(5)] == [1.0, 0.9045, 0.6545, 0.3455, 0.0955]
    assert lr_factor(ssfl, 0) == lr_factor(sdl, 0) == 1.0 and lr_factor(ssfl, 134) == pytest.approx(0.5 * (1 + math.cos(math.pi * 134 / 135)))
    assert lr_factor(lws, 0) == 1.0  # a one-epoch LWS stage trains at its full LR


def test_stage_iii_repeats_stage_i_unless_set():
    """Without a preset, `--epochs 2` gives a 2-epoch distillation stage, not the ImageNet recipe's 135."""
    assert [s.epochs for s in ssd_stages(config_from_args(["--method", "ssd", "--epochs", "2"]))[:3]] == [2, 5, 2]
    assert ssd_stages(config_from_args(["--method", "ssd", "--epochs", "2", "--ssd-sdl-epochs", "7"]))[2].epochs == 7


def test_label_masked_info_nce_drops_same_class_negatives():
    q = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    k = F.normalize(torch.tensor([[0.6, 0.8]]), dim=1)
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([3, 5])
    loss = masked_info_nce(q, k, queue, labels, torch.tensor([3]), 0.2)
    pos, neg = 0.6 / 0.2, 0.0 / 0.2  # the first queue entry shares class 3: not a negative
    assert loss.item() == pytest.approx(-math.log(math.exp(pos) / (math.exp(pos) + math.exp(neg))), rel=1e-5)


def test_distillation_is_t_squared_kl_with_batchmean():
    student, teacher = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    p, log_q = torch.softmax(teacher / 2, 1), torch.log_softmax(student / 2, 1)
    expected = 4 * (p * (p.log() - log_q)).sum().item()
    assert distillation(student.repeat(3, 1), teacher.repeat(3, 1), 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_class_aware_sampler_draws_pairs_from_balanced_classes():
    targets = [0] * 50 + [1] * 5 + [2] * 2
    order = list(ClassAwareSampler(targets, 2, torch.Generator().manual_seed(0)))
    assert len(order) == len(targets)
    classes = [targets[i] for i in order]
    assert all(classes[i] == classes[i + 1] for i in range(0, len(classes) - 1, 2))  # 2 consecutive per class
    counts = np.bincount(classes)
    assert counts.max() - counts.min() <= 4  # balanced, whatever the imbalance
    ranks = [list(ClassAwareSampler(targets, 2, torch.Generator().manual_seed(0), r, 2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(order)


def test_ssd_trains_all_stages_and_exports_either_head(tmp_path):
    train_cli(*SSD_TINY, "--epochs", "3", "--ssd-slg-epochs", "1", "--ssd-sdl-epochs", "3",
               "--ssd-lws-epochs", "1", "--out", str(tmp_path / "ssd"))
    data = load_checkpoint(tmp_path / "ssd" / "ssd.pt")
    assert data["spec"]["expert_names"] == ["hard", "soft"] and data["epoch"] == 8
    assert max(e["overall"] for e in data["metrics"]["experts"]) > 15  # chance: 10 % (a few epochs per stage)
    # the log's served column is the soft head that export serves by default, never the mean of the two heads
    assert data["metrics"]["served_label"] == "soft head" and data["metrics"]["ensemble"] == data["metrics"]["experts"][1]
    assert "experts.0.head.weight" in data["state_dict"] and "experts.0.head.scales" in data["training"]["model_state"]
    model, _ = load_model(tmp_path / "ssd" / "ssd.pt")
    images = np.random.RandomState(8).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(model.spec.mean)[:, None, None]) \
        / torch.tensor(model.spec.std)[:, None, None]
    with torch.no_grad():
        ref = model(x)
    for head, index in (("soft", 1), ("hard", 0)):
        export_cli("--ckpt", str(tmp_path / "ssd" / "ssd.pt"), "--out", str(tmp_path / "repo"),
                   "--head", head, "--fusion", "grouped", "--max-batch", "4")
        got = ort_logits(tmp_path / "repo" / f"ssd_{head}" / "1" / "model.onnx", images)
        assert np.abs(got - ref[:, index].numpy()).max() <= 1e-4
    proc = export_cli("--ckpt", str(tmp_path / "ssd" / "ssd.pt"), "--head", "medium", check=False)
    assert proc.returncode == 2 and "heads are hard, soft" in proc.stderr


def test_lws_scales_fold_exactly():
    lws = LWSHead(6, 4)
    with torch.no_grad():
        lws.fc.weight.normal_()
        lws.scales.copy_(torch.tensor([0.5, 1.5, 2.0, 0.1]))
    x = torch.randn(3, 6)
    assert torch.allclose(lws(x), lws.folded()(x), atol=1e-6)


def _resnext_state(prefix: str) -> dict:
    return {f"module.{prefix}.{k}": v for k, v in torchvision.models.resnext50_32x4d().state_dict().items()
            if not k.startswith("fc.")}


def test_convert_official_ssd_stage3_and_lws_checkpoints(tmp_path):
    stage3 = {**_resnext_state("encoder_q"), **_resnext_state("encoder_t")}
    for head in ("classifier", "classifier_kd", "classifier_t.fc"):
        stage3[f"module.{head}.weight"], stage3[f"module.{head}.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    stage3["module.classifier_t.scales"] = torch.rand(1000)
    torch.save({"epoch": 135, "state_dict": stage3, "optimizer": {}, "best_acc1": 55.4}, tmp_path / "s3.pth.tar")
    convert_cli("--from", "ssd", "--src", str(tmp_path / "s3.pth.tar"), "--out", str(tmp_path / "s3.pt"))
    model, data = load_model(tmp_path / "s3.pt")
    assert data["spec"]["arch"] == "resnext50_32x4d" and data["spec"]["expert_names"] == ["hard", "soft"]
    assert torch.equal(model.state_dict()["experts.1.head.weight"], stage3["module.classifier_kd.weight"])
    assert torch.equal(model.state_dict()["trunk.layer4.2.bn3.running_var"], stage3["module.encoder_q.layer4.2.bn3.running_var"])

    stage4 = _resnext_state("encoder")
    stage4["module.classifier.fc.weight"], stage4["module.classifier.fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    stage4["module.classifier.scales"] = torch.rand(1000) + 0.5
    torch.save({"epoch": 5, "state_dict": stage4}, tmp_path / "s4.pth.tar")
    convert_cli("--from", "ssd", "--src", str(tmp_path / "s4.pth.tar"), "--out", str(tmp_path / "s4.pt"))
    model, data = load_model(tmp_path / "s4.pt")
    assert data["spec"]["expert_names"] == ["hard"]
    folded = stage4["module.classifier.fc.weight"] * stage4["module.classifier.scales"][:, None]
    assert torch.allclose(model.state_dict()["experts.0.head.weight"], folded)


def test_label_queue_starts_at_class_0_like_the_official_code():
    """Unfilled entries carry label 0: a class-0 query has no negatives yet (loss log 1 = 0), others see all."""
    cfg = config_from_args([*SSD_TINY, "--moco-queue", "4", "--moco-dim", "2"])
    model = build_model(ModelSpec(**SSD.adapt_spec(ModelSpec(arch="resnet8").to_dict())))
    aux = SSD(cfg, model, [5] * 10).aux
    assert aux.queue_labels.tolist() == [[0, 0, 0, 0]]
    q = k = torch.tensor([[1.0, 0.0]])
    assert masked_info_nce(q, k, aux.queue[0], aux.queue_labels[0], torch.tensor([0]), 0.2).item() == 0.0
    assert masked_info_nce(q, k, aux.queue[0], aux.queue_labels[0], torch.tensor([1]), 0.2).item() > 0.0
    legacy = SSD(config_from_args([*SSD_TINY, "--ssd-queue-fill-label", "-1"]), model, [5] * 10).aux
    assert set(legacy.queue_labels.flatten().tolist()) == {-1}


def test_class_aware_sampler_reshuffles_a_class_list_at_every_wrap():
    """Class 0 has 3 images and is drawn 3 at a time: every draw is one pass over its list, and the passes come
    in different orders (the official RandomCycleIter reshuffles when it wraps around)."""
    targets = [0] * 3 + [1] * 57
    order = list(ClassAwareSampler(targets, 3, torch.Generator().manual_seed(0)))
    passes = [tuple(order[i:i + 3]) for i in range(0, len(order), 3) if targets[order[i]] == 0]
    assert len(passes) >= 8 and all(sorted(p) == [0, 1, 2] for p in passes)
    assert len(set(passes)) > 1


def test_ssd_presets_follow_the_official_augmentation_and_precision():
    cfg = config_from_args(["--preset", "ssd-imagenet-lt"])
    assert (cfg.augment, cfg.key_augment, cfg.amp, cfg.ssd_queue_fill_label) == ("imagenet-basic", "mocov2", "off", 0)
    spec = ModelSpec(input_size=224, resize=256)
    query, key = training_transform(cfg.augment, cfg.key_augment, spec, views=2).transforms
    assert not any(isinstance(op, v2.RandAugment) for op in query.transforms)  # the stage scripts use none
    assert [type(op) for op in query.transforms[1:4]] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter]
    assert key.transforms[1].scale == (0.2, 1.0) and config_from_args(["--preset", "ssd-cifar100-lt"]).amp == "off"

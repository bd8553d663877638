import math

import pytest
import torch
import torch.nn.functional as F

from export.job import job_for
from tests.helpers import convert_cli, export_cli, train_cli
from tests.helpers import export_both_fusions, make_checkpoint
from train.checkpoint import load_checkpoint, load_model
from train.config import config_from_args
from train.methods import get_method
from train.methods.shike import dkt_loss, dkt_teacher
from train.models import ModelSpec, build_model
from train.models.heads import NormedLinearHead
from train.schedule import lr_factor

SHIKE_TINY = ["--method", "shike", "--dataset", "synthetic", "--arch", "resnet8", "--shortcut", "B", "--shared-stages", "3",
              "--fusion", "dkf", "--head", "normed", "--head-scale", "30", "--synthetic-max", "120", "--imb-factor", "20",
              "--synthetic-test", "30", "--batch-size", "32", "--lr", "0.05", "--crt-lr", "0.05", "--schedule",
              "warmup-cosine", "--warmup-epochs", "0", "--no-nesterov", "--weight-decay", "5e-4"]


def test_dkt_teacher_uses_the_max_but_the_mean_for_the_hardest_negative_and_zero_for_the_target():
    logits = torch.tensor([[[1.0, 5.0, 2.0, 0.0], [3.0, 1.0, 4.0, -1.0]]])  # B=1, K=2, C=4; target 0
    teacher = dkt_teacher(logits, torch.tensor([0]))
    # mean = [2, 3, 3, -0.5]; hardest negative (not the target) = class 1 (first max) -> mean 3; others max
    assert teacher.tolist() == [[0.0, 3.0, 4.0, 0.0]]


def test_dkt_loss_terms_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 1.0, 1.5]]], requires_grad=True)  # B=1, K=2, C=3
    target = torch.tensor([1])
    parts = dkt_loss(logits, target, scale=30.0, weight=10.0)
    q = torch.softmax(dkt_teacher(logits, target), 1)[0].tolist()

    def kl_mean(p, log_q):  # F.kl_div(log_q, p, 'mean') divides by B*C = 3
        return sum(pi * (math.log(pi) - lq) for pi, lq in zip(p, log_q)) / 3

    hns = 0.0
    for e in range(2):
        student = [v if c != 1 else -30.0 for c, v in enumerate(logits[0, e].tolist())]
        hns += kl_mean(q, torch.log_softmax(torch.tensor(student), 0).tolist())
    p = [torch.softmax(logits[0, e], 0).tolist() for e in range(2)]
    md = kl_mean(p[1], [math.log(v) for v in p[0]]) + kl_mean(p[0], [math.log(v) for v in p[1]])
    ce = sum(F.cross_entropy(logits[:, e], target).item() for e in range(2))
    assert parts["hns"].item() == pytest.approx(hns, rel=1e-5) and parts["md"].item() == pytest.approx(md, rel=1e-5)
    assert parts["total"].item() == pytest.approx(ce + 10 * hns + md, rel=1e-5)
    parts["total"].backward()
    assert logits.grad.abs().sum() > 0


def test_shike_schedule_matches_the_official_log():
    cfg = config_from_args(["--preset", "shike-cifar100-lt"])
    method = get_method("shike")(cfg, build_model(ModelSpec(arch="resnet8", num_classes=100, shortcut="B",
                                                            shared_stages=3, fusion="dkf", head="normed", head_scale=30)),
                                 [5] * 100)
    main, crt = method.stages()
    assert [round(main.lr * lr_factor(main, e), 6) for e in range(6)] == [0.025, 0.05, 0.075, 0.1, 0.125, 0.15]
    assert main.lr * lr_factor(main, 179) < 1e-4 and (main.epochs, crt.epochs) == (180, 20)
    assert [round(crt.lr * lr_factor(crt, t), 6) for t in range(5)] == [0.0375, 0.05, 0.0625, 0.075, 0.0875]
    assert round(crt.lr * lr_factor(crt, 16), 6) == 0.016543
    assert cfg.warmup_start == 1 / 6 and main.lr * lr_factor(main, 0) == 0.15 / 6  # exactly the official 1/6


def test_shike_preset_runs_like_the_official_loader_and_precision():
    cfg = config_from_args(["--preset", "shike-cifar100-lt"])
    assert (cfg.amp, cfg.drop_last) == ("fp16", False)
    assert config_from_args(["--preset", "shike-cifar100-lt", "--amp", "off"]).amp == "off"  # --amp still overrides
    assert config_from_args(["--preset", "shike-synthetic"]).drop_last is False


def test_normed_heads_start_with_unit_class_vectors():
    """The official init: uniform(-1, 1), renorm each class vector to 1e-5, times 1e5 (fresh stage-1 and cRT heads)."""
    torch.manual_seed(0)
    head = NormedLinearHead(64, 100)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(100), atol=1e-6)
    assert head.weight.abs().max() <= 1.0 and (head.weight > 0).any() and (head.weight < 0).any()
    model = build_model(ModelSpec(arch="resnet8", num_classes=10, shortcut="B", shared_stages=3, fusion="dkf",
                                  head="normed", head_scale=30))
    method = get_method("shike")(config_from_args(["--preset", "shike-synthetic"]), model, [5] * 10)
    method.enter_stage(method.stages()[1], model)  # cRT builds fresh heads the same way
    assert all(torch.allclose(e.head.weight.norm(dim=1), torch.ones(10), atol=1e-6) for e in model.experts)


def test_dkf_architecture_matches_the_official_layout():
    model = build_model(ModelSpec(arch="resnet32", num_classes=100, shortcut="B", shared_stages=3, fusion="dkf",
                                  head="normed", head_scale=30))
    assert [e.source for e in model.experts] == [1, 2, 1]  # expert e <- layer (e mod 2) + 1
    assert [len(e.fusion.units) for e in model.experts] == [2, 1, 2]
    assert model.experts[1].fusion.units[0][0].weight.shape == (64, 32, 3, 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3, 100)


def test_short_synthetic_run_learns_and_crt_freezes_the_trunk(tmp_path):
    train_cli(*SHIKE_TINY, "--epochs", "3", "--crt-epochs", "1", "--out", str(tmp_path / "crt"))
    train_cli(*SHIKE_TINY, "--epochs", "3", "--out", str(tmp_path / "plain"))
    crt, plain = load_checkpoint(tmp_path / "crt" / "shike.pt"), load_checkpoint(tmp_path / "plain" / "shike.pt")
    assert crt["metrics"]["ensemble"]["overall"] > 20  # chance: 10 % (3 epochs of the two-view synthetic set)
    a, b = crt["state_dict"], plain["state_dict"]
    assert torch.equal(a["trunk.conv1.weight"], b["trunk.conv1.weight"])  # frozen during cRT
    assert torch.equal(a["experts.2.fusion.units.0.0.weight"], b["experts.2.fusion.units.0.0.weight"])
    assert not torch.equal(a["trunk.bn1.running_mean"], b["trunk.bn1.running_mean"])  # BN statistics still update
    assert not torch.equal(a["experts.0.head.weight"], b["experts.0.head.weight"])  # fresh, re-trained heads


def test_shike_exports_with_grouped_fusion_of_the_per_expert_parts(tmp_path):
    ckpt = make_checkpoint(tmp_path / "shike.pt", shortcut="B", shared_stages=3, fusion="dkf", head="normed",
                           head_scale=30)
    export_both_fusions(job_for(ckpt, expert_logits=True, max_batch=8), tmp_path, ("expert_logits",))
    export_cli("--ckpt", str(ckpt), "--out", str(tmp_path / "repo"), "--fusion", "grouped",
               "--experts", "0,1", "--max-batch", "4")


def official_shike_state(classes: int = 100) -> dict:
    """The official SHIKE CIFAR state dict: keys and shapes as the reference notes list them (366 entries)."""
    state = {}

    def bn(prefix, ch):
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{prefix}.{name}"] = torch.rand(ch) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(3)

    def block(prefix, planes, in_planes):
        state[f"{prefix}.conv1.weight"] = torch.randn(planes, in_planes, 3, 3) * 0.1
        bn(f"{prefix}.bn1", planes)
        state[f"{prefix}.conv2.weight"] = torch.randn(planes, planes, 3, 3) * 0.1
        bn(f"{prefix}.bn2", planes)
        if planes != in_planes:
            state[f"{prefix}.shortcut.0.weight"] = torch.randn(planes, in_planes, 1, 1) * 0.1
            bn(f"{prefix}.shortcut.1", planes)

    state["conv1.weight"] = torch.randn(16, 3, 3, 3)
    bn("bn1", 16)
    for b in range(5):
        block(f"layer1.{b}", 16, 16)
        block(f"layer2.{b}", 32, 16 if b == 0 else 32)
    for e in range(3):
        for b in range(5):
            block(f"layer3s.{e}.{b}", 64, 32 if b == 0 else 64)
        ins = [16, 32] if e % 2 == 0 else [32]
        for k, c in enumerate(ins):
            state[f"shallow_exps.{e}.convs.StridedConv{k}.conv.0.weight"] = torch.randn(2 * c, c, 3, 3) * 0.1
            bn(f"shallow_exps.{e}.convs.StridedConv{k}.conv.1", 2 * c)
        state[f"classifiers.{e}.weight"] = torch.randn(64, classes)
        state[f"rt_classifiers.{e}.weight"] = torch.randn(64, classes)
    return state


def test_convert_official_shike(tmp_path):
    state = official_shike_state()
    assert len(state) == 366
    torch.save({"epoch": 200, "architecture": "resnet32", "state_dict": state, "best_acc1": 56.34}, tmp_path / "s.pth.tar")
    convert_cli("--from", "shike", "--src", str(tmp_path / "s.pth.tar"), "--out", str(tmp_path / "shike.pt"),
                "--dataset", "cifar100-lt")
    model, data = load_model(tmp_path / "shike.pt")
    spec = data["spec"]
    assert (spec["fusion"], spec["shared_stages"], spec["shortcut"], spec["head"]) == ("dkf", 3, "B", "normed")
    ours = model.state_dict()
    assert torch.equal(ours["experts.1.head.weight"], state["rt_classifiers.1.weight"].t())  # cRT heads, transposed
    assert torch.equal(ours["experts.2.fusion.units.1.1.running_var"], state["shallow_exps.2.convs.StridedConv1.conv.1.running_var"])
    assert torch.equal(ours["trunk.layer2.0.shortcut.0.weight"], state["layer2.0.shortcut.0.weight"])
    assert len(ours) == 366 - 3  # the stage-1 heads are not served
    convert_cli("--from", "shike", "--src", str(tmp_path / "s.pth.tar"), "--out", str(tmp_path / "s1.pt"),
                "--stage1-heads")
    assert torch.equal(load_model(tmp_path / "s1.pt")[0].state_dict()["experts.0.head.weight"], state["classifiers.0.weight"].t())


def test_resume_across_the_crt_boundary_is_exact(tmp_path):
    from train.engine import train
    tiny = [*SHIKE_TINY, "--synthetic-max", "60", "--synthetic-test", "10"]
    straight = train(config_from_args([*tiny, "--epochs", "2", "--crt-epochs", "1", "--out", str(tmp_path / "a")]))
    train(config_from_args([*tiny, "--epochs", "2", "--crt-epochs", "0", "--out", str(tmp_path / "b")]))
    resumed = train(config_from_args([*tiny, "--epochs", "2", "--crt-epochs", "1", "--resume", "--out", str(tmp_path / "b")]))
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 3 and a["training"]["stage"] == b["training"]["stage"] == 1
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_dkf_generalises_to_resnet50_class_trunks():
    model = build_model(ModelSpec(arch="resnet50", num_classes=10, num_experts=3, shared_stages=4, fusion="dkf",
                                  head="normed", head_scale=30, input_size=64))
    assert [e.source for e in model.experts] == [1, 2, 3]  # layer1..layer3 cycled
    assert [len(e.fusion.units) for e in model.experts] == [3, 2, 1]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3, 10)

import pytest
import torch
import torchvision

from expertfuse.errors import UserError
from train.models import ModelSpec, build_model
from train.models.backbones import ShortcutA
from train.models.heads import CosineHead, LWSHead


def test_resnet32_ncl_layout_and_size():
    model = build_model(ModelSpec(arch="resnet32", num_classes=100, num_experts=3, shortcut="A"))
    keys = model.state_dict().keys()
    assert not any("shortcut" in k for k in keys)  # option A has no parameters
    per_expert = sum(p.numel() for p in model.experts[0].parameters())
    assert 460_000 < per_expert < 475_000  # ResNet-32 (0.46 M) + 64x100 head
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3, 100)


def test_shortcut_b_and_shared_trunk_layout():
    model = build_model(ModelSpec(arch="resnet32", num_classes=10, num_experts=3, shortcut="B", shared_stages=3))
    keys = set(model.state_dict())
    assert "trunk.layer2.0.shortcut.0.weight" in keys and "trunk.conv1.weight" in keys
    assert "experts.2.backbone.layer3.0.shortcut.1.running_var" in keys
    assert not any(k.startswith("trunk.layer3") or k.startswith("experts.0.backbone.layer1") for k in keys)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3, 10)


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_torchvision_trunks_keep_torchvision_key_names(arch):
    model = build_model(ModelSpec(arch=arch, num_classes=7, num_experts=1, head="cosine", input_size=64))
    ours = {k.removeprefix("experts.0.backbone.") for k in model.state_dict() if ".backbone." in k}
    theirs = {k for k in getattr(torchvision.models, arch)().state_dict() if not k.startswith("fc.")}
    assert ours == theirs
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1, 7)


def test_cosine_head_is_scale_bounded_and_lws_folds_exactly():
    head = CosineHead(8, 4, scale=16, bias=False)
    assert head(torch.randn(5, 8) * 1000).abs().max() <= 16 + 1e-4
    assert torch.equal(head(torch.zeros(1, 8)), torch.zeros(1, 4))  # epsilon: no NaN on zero features
    lws = LWSHead(8, 4)
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0]))
    x = torch.randn(3, 8)
    assert torch.allclose(lws(x), lws.folded()(x), atol=1e-6)
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ["scales"]


def test_spec_rejects_bad_values():
    with pytest.raises(UserError, match="unknown architecture"):
        ModelSpec(arch="vgg")
    with pytest.raises(UserError, match="unknown fields"):
        ModelSpec.from_dict({"arch": "resnet32", "color": "red"})


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.arange(64.0).reshape(1, 4, 4, 4)
    out = ShortcutA(planes=8)(x)
    assert out.shape == (1, 8, 2, 2)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2]) and not out[:, :2].any() and not out[:, 6:].any()


@pytest.mark.parametrize("shared_stages", [0, 2])
def test_some_experts_run_alone_give_exactly_their_logits_of_the_whole_network(shared_stages):
    """What an export of some experts is checked against: those experts run (in the order asked), the rest not."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet8", num_classes=5, num_experts=3, shared_stages=shared_stages)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, experts=[2, 0]), model(x)[:, [2, 0]])

import torch
import pytest

from tests.helpers import convert_cli, run_module
from train.checkpoint import (CheckpointError, CheckpointPayload, load_checkpoint, load_model, load_payload,
                              save_checkpoint)
from train.models import ModelSpec, build_model


def _payload(model, spec) -> CheckpointPayload:
    return CheckpointPayload(spec=spec, classes=[f"c{i}" for i in range(spec.num_classes)],
                             train_counts=[5] * spec.num_classes, state_dict=model.state_dict(), method="ce", epoch=1)


def test_round_trip_rebuilds_the_exact_network(tmp_path):
    spec = ModelSpec(arch="resnet8", num_classes=5, num_experts=2, head="cosine", head_scale=32)
    model = build_model(spec).eval()
    path = save_checkpoint(_payload(model, spec), tmp_path / "m.pt")
    loaded, data = load_model(path)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert data["classes"][4] == "c4" and not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    raw = torch.load(path, weights_only=True)  # the contract: loads without unpickling objects
    assert raw["format"] == "expertfuse-checkpoint" and raw["version"] == 1 and "training" not in raw
    typed = load_payload(path)
    assert typed.spec == spec and typed.epoch == 1 and typed.training is None
    assert CheckpointPayload.from_dict(typed.to_dict()).to_dict().keys() == raw.keys()


class ForeignObject:
    """Anything torch.load(weights_only=True) must not unpickle."""


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable expertfuse checkpoint .not a PyTorch file"):
        load_checkpoint(tmp_path / "text.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(135, 256)) * 30)  # torch.load alone says only "(135)"
    with pytest.raises(CheckpointError, match=r"neither a zip archive nor a pickle\); give a file written by") as err:
        load_checkpoint(tmp_path / "random.pt")
    assert "\n" not in str(err.value)
    torch.save({"state_dict": ForeignObject()}, tmp_path / "pickled.pt")  # weights_only must refuse, in one line
    with pytest.raises(CheckpointError, match=r"not a readable expertfuse checkpoint \(Unsupported global") as err:
        load_checkpoint(tmp_path / "pickled.pt")
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an expertfuse checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": "expertfuse-checkpoint", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
    spec = ModelSpec(arch="resnet8", num_classes=5, num_experts=2)
    payload = _payload(build_model(spec), spec)
    payload.spec = ModelSpec(arch="resnet8", num_classes=5, num_experts=3)
    save_checkpoint(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"does not match its spec .*: \d+ missing \(e.g. experts.2"):
        load_model(tmp_path / "mismatch.pt")
    payload.spec = ModelSpec(arch="resnet8", num_classes=6, num_experts=2)
    save_checkpoint(payload, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="does not match its spec .*size mismatch"):
        load_model(tmp_path / "shape.pt")


def official_ncl_cifar_state(moco: bool = False, classes: int = 100) -> dict:
    """The official NCL CIFAR state dict, keys and shapes as listed in the reference notes (DataParallel prefix)."""
    state = {}

    def bn(prefix, ch):
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{prefix}.{name}"] = torch.randn(ch).abs() + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    for k in range(3):
        b = f"module.backbone.{k}"
        state[f"{b}.conv1.weight"] = torch.randn(16, 3, 3, 3)
        bn(f"{b}.bn1", 16)
        for layer, planes in ((1, 16), (2, 32), (3, 64)):
            for block in range(5):
                in_planes = planes // 2 if (block == 0 and layer > 1) else planes
                state[f"{b}.layer{layer}.{block}.conv1.weight"] = torch.randn(planes, in_planes, 3, 3) * 0.1
                bn(f"{b}.layer{layer}.{block}.bn1", planes)
                state[f"{b}.layer{layer}.{block}.conv2.weight"] = torch.randn(planes, planes, 3, 3) * 0.1
                bn(f"{b}.layer{layer}.{block}.bn2", planes)
        head = "classifier_ce" if moco else "classifier"
        state[f"module.{head}.{k}.weight"] = torch.randn(classes, 64)
        state[f"module.{head}.{k}.bias"] = torch.randn(classes)
        if moco:
            state[f"module.MOCO.{k}.queue"] = torch.randn(64, 1024)
            state[f"module.MOCO.{k}.queue_ptr"] = torch.zeros(1, dtype=torch.long)
            for i in (0, 2):
                state[f"module.classifier.{k}.{i}.weight"] = torch.randn(64, 64)
                state[f"module.classifier.{k}.{i}.bias"] = torch.randn(64)
                state[f"module.classifier_MA.{k}.{i}.weight"] = torch.randn(64, 64)
            state[f"module.backbone_MA.{k}.conv1.weight"] = torch.randn(16, 3, 3, 3)
    return state


@pytest.mark.parametrize("moco", [False, True])
def test_convert_official_ncl(tmp_path, moco):
    state = official_ncl_cifar_state(moco)
    if not moco:
        assert len(state) == 564
    torch.save({"state_dict": state, "epoch": 400, "best_result": 54.4, "best_epoch": 390}, tmp_path / "official.pth")
    convert_cli("--from", "ncl", "--src", str(tmp_path / "official.pth"), "--out", str(tmp_path / "ncl.pt"),
                "--dataset", "cifar100-lt")
    model, data = load_model(tmp_path / "ncl.pt")
    assert data["spec"]["arch"] == "resnet32" and data["spec"]["num_experts"] == 3
    assert len(model.state_dict()) == 564
    head = "classifier_ce" if moco else "classifier"
    assert torch.equal(model.state_dict()["experts.2.head.weight"], state[f"module.{head}.2.weight"])
    assert torch.equal(model.state_dict()["experts.1.backbone.layer3.4.bn2.running_var"],
                       state["module.backbone.1.layer3.4.bn2.running_var"])
    assert sum(data["train_counts"]) == 10_847


def test_convert_rejects_a_foreign_file(tmp_path):
    torch.save({"state_dict": {"features.0.weight": torch.zeros(1)}}, tmp_path / "x.pth")
    proc = run_module("train.convert", "--from", "ncl", "--src", str(tmp_path / "x.pth"), "--out",
                      str(tmp_path / "o.pt"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unexpected key") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.pt").exists()


def test_convert_names_a_file_that_is_not_a_pytorch_file(tmp_path):
    (tmp_path / "x.pth").write_bytes(bytes(range(256)) * 8)
    proc = run_module("train.convert", "--from", "ncl", "--src", str(tmp_path / "x.pth"), "--out",
                      str(tmp_path / "o.pt"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"error: {tmp_path / 'x.pth'} is not a readable checkpoint (not a PyTorch file: "
                                   "neither a zip archive nor a pickle); give a file written by the official code "
                                   "(torch.save)")

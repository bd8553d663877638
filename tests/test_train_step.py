import json

import torch

from bench.train_step import main
from train.config import TrainConfig
from train.methods import get_method
from train.models import ModelSpec, build_model
from train.training.loop import TrainStep, build_optimizer


def test_the_engine_step_trains_and_the_bench_times_it(tmp_path):
    """The step the bench times is the engine's: one call changes the weights and returns the loss parts."""
    cfg = TrainConfig(method="ncl", arch="resnet8", hcm_n=3, lr=0.01)
    model = build_model(ModelSpec(arch="resnet8", num_classes=10))
    method = get_method("ncl")(cfg, model, [50, 30, 20, 10, 8, 6, 4, 3, 2, 1])
    optimizer, _ = build_optimizer(cfg, model, method, method.stages()[0])
    step = TrainStep(model, method, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    before = model.experts[0].head.weight.detach().clone()
    loss, logits, parts = step(torch.randn(8, 3, 32, 32), torch.randint(10, (8,)))
    assert torch.isfinite(loss) and logits.shape == (8, 3, 10) and set(parts) == {"nil", "nbod"}
    assert not torch.equal(before, model.experts[0].head.weight)

    result = main(["--arch", "resnet8", "--batch-size", "8", "--classes", "10", "--window-s", "0.05",
                   "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train_step_cpu.json").read_text())
    assert saved["items_per_s"] == result["items_per_s"] > 0 and saved["method"] == "ncl" and saved["amp"] == "off"

"""The float32 export gate at real depth (3 x ResNet-32, 100 classes, the CIFAR-100-LT presets' network): correct
graphs pass whatever their random weights, graphs broken on purpose are refused by a wide margin."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from bench.real_size import preset_checkpoint
from expertfuse.errors import ParityError
from expertfuse.parity import EXPORT_FP32, compare, float32_error
from export import gate
from export.gate import check_parity, expert_references
from export.job import LoadedCheckpoint, job_for
from export.onnx import export_graph, onnx_file, onnx_runner

BATCHES = [1, 16]


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> LoadedCheckpoint:
    folder = tmp_path_factory.mktemp("resnet32")
    return LoadedCheckpoint.load(preset_checkpoint("ncl-cifar100-lt", folder / "ncl.pt", seed=3))


def gate_excess(job):
    """A measure of how far an artifact's worst error lies past `job`'s gate bound (<= 1 passes) on 16 real-looking
    images, the references computed once for every artifact measured."""
    images = gate.test_images(job, 16)["real-looking"]
    ref64, ref32 = (logits.mean(1) for logits in expert_references(job, images, job.opts.experts, 16))
    scale = float32_error(ref32, ref64)
    return lambda run: compare(run(images.numpy()), ref64, EXPORT_FP32, scale).max_rel_excess


def graph_of(job, tmp_path, name: str, fusion: str = "grouped"):
    return onnx_runner(onnx_file(export_graph(job, fusion, tmp_path / name, 18)))


@pytest.fixture(scope="module")
def correct_grouped(deep, tmp_path_factory):
    """The correct graph of all experts, grouped, exported once for the tests that only run it: (job, runner)."""
    job = job_for(deep, "all", "grouped", max_batch=max(BATCHES))
    return job, graph_of(job, tmp_path_factory.mktemp("correct"), "grouped")


def broken(deep: LoadedCheckpoint, change) -> LoadedCheckpoint:
    """The checkpoint with its network changed by `change` (the graph is built from it; the gate keeps the original)."""
    model = copy.deepcopy(deep.model)
    change(model)
    return replace(deep, model=model)


def forget_batchnorm_statistics(model) -> None:
    bn = model.experts[1].backbone.layer3[4].bn2
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)


def swap_heads(model) -> None:
    model.experts[0].head, model.experts[1].head = model.experts[1].head, model.experts[0].head


def imagenet_normalization(model) -> None:
    model.spec = replace(model.spec, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


@pytest.mark.parametrize("experts,fusion", [("all", "loop"), ("all", "grouped"), ("0", "loop")])
def test_correct_deep_graphs_pass_at_every_batch(deep, correct_grouped, tmp_path, experts, fusion):
    if (experts, fusion) == ("all", "grouped"):
        job, graph = correct_grouped
    else:
        job = job_for(deep, experts, fusion, max_batch=max(BATCHES))
        graph = graph_of(job, tmp_path, fusion, fusion)
    rows = check_parity(job, graph, BATCHES)
    assert all(row["ok"] and row["ratio"] < EXPORT_FP32.factor for row in rows)
    assert {row["batch"] for row in rows} == set(BATCHES) and all(row["scale_images"] == 16 for row in rows)


def test_broken_graphs_fail_the_gate_by_a_wide_margin(deep, correct_grouped, tmp_path):
    job, correct = correct_grouped
    breaks = {"wrong normalization constants": broken(deep, imagenet_normalization),
              "a BatchNorm without its running statistics": broken(deep, forget_batchnorm_statistics),
              "two experts' heads swapped": broken(deep, swap_heads)}
    graphs = {what: graph_of(replace(job, checkpoint=ckpt), tmp_path, what.replace(" ", "_"))
              for what, ckpt in breaks.items()}
    graphs["an expert dropped"] = graph_of(job_for(deep, "0,1", "grouped"), tmp_path, "dropped")
    excess = gate_excess(job)
    margins = {what: excess(run) for what, run in graphs.items()}
    print(margins)
    assert all(margin > 100 for margin in margins.values()), margins
    assert excess(correct) < 1
    with pytest.raises(ParityError, match="nothing written"):
        check_parity(job, graphs["two experts' heads swapped"], [1, 16])


def test_fusion_auto_falls_back_when_the_faster_fusion_fails_the_gate(tmp_path, monkeypatch, capsys):
    """A grouped graph that lost its BatchNorm statistics (folded as if mean 0, variance 1), timed the faster:
    auto gates it, says why it fails, and writes the correct loop graph instead of nothing."""
    import export.fusion
    import export.onnx
    from expertfuse.cli import run_cli
    from tests.helpers import make_checkpoint

    def fold_without_statistics(conv, bn):
        return conv.weight * (bn.weight / (1 + bn.eps) ** 0.5)[:, None, None, None], bn.bias
    monkeypatch.setattr(export.fusion, "fold_bn", fold_without_statistics)
    monkeypatch.setattr(export.onnx, "pick_fastest", lambda runners, inputs: ("grouped", {}))  # the timer's verdict
    ckpt = make_checkpoint(tmp_path / "m.pt")
    code = run_cli(lambda: export.onnx.export_onnx(["--ckpt", str(ckpt), "--out", str(tmp_path / "repo"),
                                                    "--max-batch", "4"]))
    out = capsys.readouterr().out
    report = (tmp_path / "repo" / "ncl" / "1" / "export_report.json").read_text()
    assert code == 0 and "fusion grouped failed the export gate, falling back to loop" in out
    assert '"fusion": "loop"' in report and '"fusion_order": [\n    "grouped",\n    "loop"\n  ]' in report

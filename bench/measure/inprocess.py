"""In-process variants: every expert alone, the best-k subsets, the fused ensemble (loop, grouped), FP16 and any
INT8 or early-exit model of the repository, on torch / ONNX Runtime / TensorRT. Each is gated (random images first,
then the labelled set) and scored on the labelled set, then all are timed together, interleaved."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tritonclient.grpc import model_config_pb2 as pb

from bench.measure.evaluation import accuracy, batched_logits
from export.labelled import EvalSet, expert_logits
from bench.measure.runners import OrtRunner, Runner, TensorRTRunner, TorchRunner, cycling_calls
from bench.measure.timed_images import timed_index, timing_batches
from expertfuse.contract import LOGITS
from expertfuse.parity import bench_tolerance, compare
from expertfuse.timing import MAX_EXTENSION, Interleaved, interleave
from export.early_exit import simulate
from export.graph import InferenceGraph
from export.onnx import export_graph, onnx_file
from serve.repository import RepositoryError, read_config, string_parameters, versions

EVAL_BATCH = 256


@dataclass(frozen=True)
class EarlyExit:
    """An early-exit model's expert order and thresholds (its parameters: the rule as written, e.g. '0.9' or
    '0.9,0.95,1' per shot group, and the threshold of every class); its reference is export.early_exit.simulate."""
    order: tuple[int, ...]
    threshold: str
    class_thresholds: tuple[float, ...]

    @classmethod
    def of(cls, params: dict[str, str]) -> "EarlyExit | None":
        if "expertfuse_early_exit_threshold" not in params:
            return None
        order = tuple(int(k) for k in params["expertfuse_early_exit_order"].split(","))
        rule = params["expertfuse_early_exit_threshold"]
        per_class = params.get("expertfuse_early_exit_class_thresholds", rule)  # a model exported before 2026-12-05
        return cls(order, rule, tuple(float(t) for t in per_class.split(",")))


def reference_key(experts, precision: str, early_exit_threshold: str | None) -> tuple:
    """Which in-process logits a served model is checked against: same experts, precision and early exit."""
    return tuple(experts), precision, early_exit_threshold


def cheap_role(params: dict[str, str]) -> str | None:
    """'early-exit' or 'int8' for the repository's cheaper models (export --early-exit / --int8), else None."""
    if EarlyExit.of(params):
        return "early-exit"
    return "int8" if params.get("expertfuse_precision") == "int8" else None


@dataclass(frozen=True)
class Variant:
    name: str
    experts: tuple[int, ...]
    fusion: str = "loop"
    precision: str = "fp32"
    onnx: Path | None = None  # a model already in the repository (INT8, early exit), run as it is
    subset: int = 0  # k when this is the best-k subset of experts (0: not on that curve)
    early_exit: EarlyExit | None = None
    exported: tuple[str, Path] | None = None  # (model, .onnx) the repository's export of this very variant

    def describe(self) -> dict:
        return {"variant": self.name, "experts": list(self.experts), "fusion": self.fusion, "precision": self.precision,
                **({"subset": self.subset} if self.subset else {}),
                **({"early_exit_threshold": self.early_exit.threshold} if self.early_exit else {}),
                **({"exported_from": self.exported[0]} if self.exported else {})}


def available_runtimes() -> list[str]:
    runtimes = ["torch-cpu", "onnxruntime-cpu"]
    if torch.cuda.is_available():
        runtimes += ["torch-cuda", "torch-cuda-cudagraphs"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            runtimes.append("onnxruntime-cuda")
        if "TensorrtExecutionProvider" in ort.get_available_providers():
            runtimes.append("onnxruntime-tensorrt")
        try:
            import tensorrt  # noqa: F401
            runtimes.append("tensorrt")
        except ImportError:
            pass
    return runtimes


def plan_variants(expert_order: list[int]) -> list[Variant]:
    """Each expert; the best-k subsets for k = 2..K-1 (best 1 is the best expert, best K the ensemble); the fused
    ensemble both ways; FP16. `expert_order` ranks the experts by accuracy, best first."""
    k_all = len(expert_order)
    every = tuple(range(k_all))
    variants = [Variant(f"expert{k}", (k,), subset=1 if k == expert_order[0] else 0) for k in range(k_all)]
    variants += [Variant(f"best{m}", tuple(sorted(expert_order[:m])), subset=m) for m in range(2, k_all)]
    variants += [Variant("ensemble-loop", every, "loop", subset=k_all), Variant("ensemble-grouped", every, "grouped"),
                 Variant("ensemble-fp16", every, "loop", "fp16")]
    return variants


def served_experts(params: dict[str, str], num_experts: int) -> tuple[int, ...]:
    """The experts a model's parameters record ('0,2' or '[0, 2]'); none recorded: all of them."""
    text = params.get("expertfuse_experts", "").strip("[] ")
    return tuple(int(e) for e in text.split(",") if e.strip()) or tuple(range(num_experts))


def repository_models(repository: Path | None) -> Iterator[tuple[pb.ModelConfig, dict[str, str], Path]]:
    """(config, string parameters, latest version's .onnx file) of every ONNX model in the repository."""
    for model_dir in sorted(repository.iterdir()) if repository and repository.is_dir() else []:
        try:
            cfg, latest = read_config(model_dir), versions(model_dir)
        except (RepositoryError, OSError, ValueError):
            continue
        path = model_dir / str(latest[-1]) / "model.onnx" if latest else None
        if path is not None and path.exists():
            yield cfg, string_parameters(cfg), onnx_file(path)


def repository_variants(repository: Path | None, num_experts: int) -> list[Variant]:
    """Every INT8 and early-exit model in the repository."""
    return [Variant(f"{role}:{cfg.name}", served_experts(params, num_experts), params.get("expertfuse_fusion", "loop"),
                    params.get("expertfuse_precision", "fp32"), path, early_exit=EarlyExit.of(params))
            for cfg, params, path in repository_models(repository) if (role := cheap_role(params))]


def with_repository_exports(variants: list[Variant], repository: Path | None, checkpoint_sha256: str,
                            num_experts: int) -> list[Variant]:
    """The planned variants, each pointing at the repository's export of it where export.onnx made one from this very
    checkpoint (its SHA-256) with the bench's graph options (uint8 input, logits only): the bench gates and times
    the file the repository serves instead of exporting it again (seconds per graph at ResNet-8, more at real size).
    Every other variant is exported as before."""
    exports = {}
    for cfg, params, path in repository_models(repository):
        if (params.get("expertfuse_checkpoint_sha256") == checkpoint_sha256 and cheap_role(params) is None
                and params.get("expertfuse_input_layout") == "uint8-nhwc" and [o.name for o in cfg.output] == [LOGITS]):
            key = (served_experts(params, num_experts), params.get("expertfuse_fusion", "loop"),
                   params.get("expertfuse_precision", "fp32"))
            exports.setdefault(key, (cfg.name, path))
    return [replace(v, exported=exports.get((v.experts, v.fusion, v.precision))) for v in variants]


def make_runner(runtime: str, job, variant: Variant, workdir: Path) -> Runner:
    """A runner of `variant` on `runtime`; raises RuntimeError when that runtime cannot run it."""
    if variant.onnx is not None:
        if not runtime.startswith("onnxruntime"):
            raise RuntimeError("a repository model runs on ONNX Runtime only")
        return OrtRunner(variant.onnx, runtime.split("-", 1)[1])
    sub = replace(job, opts=replace(job.opts, experts=variant.experts, fusion=variant.fusion,
                                    fp16=variant.precision == "fp16"))
    if runtime.startswith("torch"):
        if variant.precision != "fp32":
            raise RuntimeError("reduced precision is timed through ONNX Runtime")
        device = "cuda" if "cuda" in runtime else "cpu"
        return TorchRunner(InferenceGraph(sub.model, sub.opts), device, cuda_graphs=runtime.endswith("cudagraphs"))
    folder = workdir / f"{'_'.join(map(str, variant.experts))}-{variant.fusion}-{variant.precision}"
    if variant.exported is None and not (folder / "model.onnx").exists():
        export_graph(sub, variant.fusion, folder, 18)
    graph = variant.exported[1] if variant.exported else onnx_file(folder / "model.onnx")
    if runtime.startswith("onnxruntime"):
        return OrtRunner(graph, runtime.split("-", 1)[1])
    if runtime == "tensorrt":
        from export.trt import build_plan, require_tensorrt
        size = job.spec.input_size
        folder.mkdir(parents=True, exist_ok=True)
        plan = folder / "model.plan"
        plan.write_bytes(build_plan(require_tensorrt(), graph, (size, size, 3),
                                    (1, 32, 256), variant.precision == "fp16", 4.0, None, False))
        return TensorRTRunner(plan)
    raise ValueError(f"unknown runtime {runtime!r}; available: {', '.join(available_runtimes())}")


def parity_images(size: int, count: int) -> np.ndarray:
    """The fixed random uint8 NHWC images every runner is checked on first (the fast gate)."""
    return np.random.RandomState(7).randint(0, 256, (count, size, size, 3), dtype=np.uint8)


@dataclass
class References:
    """PyTorch FP32 logits of every expert on the random gate images and on the labelled set."""
    random_images: np.ndarray
    random: np.ndarray  # [n, K, C]
    labelled: np.ndarray  # [N, K, C]
    ensemble_pred: np.ndarray = field(init=False)

    def __post_init__(self):
        self.ensemble_pred = self.labelled.mean(1).argmax(1)

    @classmethod
    def build(cls, model, data: EvalSet, gate_images: int = 16) -> "References":
        images = parity_images(model.spec.input_size, gate_images)
        return cls(images, expert_logits(model, images), expert_logits(model, data.pixels))

    def experts_run(self, experts: tuple[int, ...], early_exit: EarlyExit | None = None,
                    images: np.ndarray | None = None) -> float:
        """Experts run per image on the labelled set (or the `images` of it: an index): all of them, or as many as
        an early-exit model's exits let."""
        if early_exit is None:
            return float(len(experts))
        logits = self.labelled if images is None else self.labelled[images]
        return float(simulate(logits, list(early_exit.order), np.array(early_exit.class_thresholds))[1].mean())

    def of(self, experts: tuple[int, ...], labelled: bool = True, early_exit: EarlyExit | None = None) -> np.ndarray:
        """The PyTorch logits of the experts' mean, or of an early-exit model's per-sample exits."""
        logits = self.labelled if labelled else self.random
        if early_exit is not None:
            return simulate(logits, list(early_exit.order), np.array(early_exit.class_thresholds))[0]
        return logits[:, list(experts)].mean(1)


def gate_and_score(runner: Runner, experts: tuple[int, ...], precision: str, refs: References, data: EvalSet,
                   batch: int = EVAL_BATCH, labelled_reference: np.ndarray | None = None,
                   early_exit: EarlyExit | None = None) -> dict:
    """Random-image parity (fast), then the labelled set against `labelled_reference` (the in-process logits of the
    same variant; default: PyTorch) under the precision's bench tolerance, then accuracy. 'refused' names the gate
    that failed; parity_labelled.against names the reference."""
    tol = bench_tolerance(precision)
    fast = compare(runner.logits(refs.random_images), refs.of(experts, labelled=False, early_exit=early_exit), tol)
    row = {"parity_random": fast.to_dict()}
    if not fast.ok:
        return {**row, "refused": "parity on random images"}
    logits = batched_logits(runner, data.pixels, batch)
    reference = refs.of(experts, early_exit=early_exit) if labelled_reference is None else labelled_reference
    labelled = compare(logits, reference, tol)
    against = "pytorch" if labelled_reference is None else "in-process"
    row.update(parity_labelled={**labelled.to_dict(), "against": against}, logits=logits)
    if not labelled.ok:
        return {**row, "refused": "predictions on the labelled set"}
    return {**row, "accuracy": {**accuracy(logits, data, refs.ensemble_pred),
                                "experts_run": refs.experts_run(experts, early_exit)}}


def time_interleaved(runners: dict[str, Runner], batches: list[np.ndarray], budget_s: float) -> Interleaved:
    """All runners on the same image batches (bench.measure.timed_images), in randomized blocks so that load on the
    machine hits every one alike."""
    inputs = {key: r.prepare_all(batches) for key, r in runners.items()}
    return interleave(cycling_calls(runners, inputs), calls_per_block=3, warmup=2, budget_s=budget_s,
                      max_s=MAX_EXTENSION * budget_s)


def timing_row(timing: Interleaved, key: str, batch: int, experts_run: float) -> dict:
    """One variant's timing at one batch size, with the experts it ran per image on the timed images."""
    if not timing.measured:
        return {"measured": False, "not_measured": timing.not_measured}
    return {**timing.summary(key, batch), "experts_run_timed": experts_run}


def key_of(variant: str, runtime: str) -> str:
    return f"{variant}@{runtime}"


def run_inprocess(job, runtimes: list[str], variants: list[Variant], refs: References, data: EvalSet,
                  batches: list[int], budget_s: float, workdir: Path, log=print) -> tuple[list[dict], dict]:
    """Gate and score every (variant, runtime), then time the admitted ones interleaved at each batch size.
    Returns (rows: one per variant/runtime with accuracy and per-batch latencies, {batch: Interleaved})."""
    rows, runners, timed_runs = [], {}, {}
    try:
        for runtime in runtimes:
            for variant in variants:
                base = {**variant.describe(), "runtime": runtime}
                try:
                    runner = make_runner(runtime, job, variant, workdir)
                    verdict = gate_and_score(runner, variant.experts, variant.precision, refs, data,
                                             early_exit=variant.early_exit)
                except Exception as exc:  # noqa: BLE001 - e.g. ORT has no FP16 kernel here: recorded, not fatal
                    rows.append({**base, "skipped": str(exc).splitlines()[0][:200]})
                    log(f"  {variant.name:>16} {runtime:<16} not run here: {rows[-1]['skipped']}")
                    continue
                rows.append({**base, **verdict})
                if "refused" in verdict:
                    log(f"  {variant.name:>16} {runtime:<16} REFUSED: {verdict['refused']}")
                    runner.close()
                    continue
                acc = verdict["accuracy"]
                log(f"  {variant.name:>16} {runtime:<16} top-1 {acc['overall']:5.1f}%  few {acc['few']:5.1f}%  "
                    f"agreement {acc['agreement']:5.1f}%")
                runners[key_of(variant.name, runtime)] = runner
                timed_runs[key_of(variant.name, runtime)] = {
                    b: refs.experts_run(variant.experts, variant.early_exit, timed_index(len(data.pixels), b))
                    for b in batches}
        timings = {}
        for batch in batches:
            log(f"  timing {len(runners)} variants interleaved at batch {batch}")
            timings[batch] = time_interleaved(runners, timing_batches(data.pixels, batch), budget_s)
            if not timings[batch].measured:
                log(f"  batch {batch} NOT MEASURED: {timings[batch].not_measured}")
        for row in rows:
            key = key_of(row["variant"], row["runtime"])
            if key in runners:
                row["timing"] = {b: timing_row(t, key, b, timed_runs[key][b]) for b, t in timings.items()}
        return rows, timings
    finally:
        for runner in runners.values():
            runner.close()

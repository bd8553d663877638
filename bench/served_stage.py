"""The served stage: every model of the checkpoint on Triton, gated and scored on the labelled set over HTTP and
gRPC, then a concurrency sweep per model (latency-throughput curves) and one interleaved run at concurrency 1 for
the served ratios (fused / naive, served / in-process, ensemble / single)."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.decide import accuracy_columns, ratio_row
from bench.measure.inprocess import (EarlyExit, Variant, cheap_role, gate_and_score, make_runner, reference_key,
                                     served_experts)
from bench.measure.runners import TritonRunner, cycling_calls
from bench.measure.served import choose_load_generator, measure_point, run_perf_analyzer
from bench.measure.timed_images import timing_batches
from expertfuse.errors import UserError
from expertfuse.timing import MAX_EXTENSION, interleave, ratio
from serve.protocols import PROTOCOLS, client_module, model_config_dict, ready_model_names
from serve.repository import string_parameters
from serve.server import TritonServer, choose_server

TIMED_ROLES = ("fused", "single", "naive", "int8", "early-exit")


def model_roles(ready: set[str], fused: str, best: int, num_experts: int, cheap: dict[str, str]) -> dict[str, str]:
    """Model name -> role: the fused ensemble, the best expert ('single'), the naive ensemble, every other expert
    (scored, not timed) and the cheaper models (`cheap`: name -> 'int8' | 'early-exit')."""
    roles = {f"{fused}_expert{k}": "single" if k == best else f"expert{k}" for k in range(num_experts)}
    roles.update({fused: "fused", f"{fused}_naive": "naive", **cheap})
    return {name: role for name, role in roles.items() if name in ready}


def ready_models(url: str, protocol: str) -> dict[str, dict[str, str]]:
    """READY model name -> its config parameters."""
    module = client_module(protocol)
    client = module.InferenceServerClient(url)
    try:
        return {n: string_parameters(model_config_dict(client, protocol, n)) for n in ready_model_names(client, protocol)}
    finally:
        client.close()


@dataclass
class ServedTarget:
    """What the served stage measures: protocol -> URL, the READY models (name -> config parameters), the role of
    each model of the checkpoint among them, and the perf_analyzer binary when it generates the load."""
    urls: dict[str, str]
    ready: dict[str, dict[str, str]]
    roles: dict[str, str]
    perf_analyzer: str | None = None


def given_urls(args) -> dict[str, str]:
    """protocol -> URL of the server given by flags ({} when none is): one URL alone serves its own protocol only."""
    given = {p: url for p, url in (("http", args.http_url), ("grpc", args.grpc_url)) if url}
    if not given:
        return {}
    protocols = args.protocols or list(given)
    missing = [p for p in protocols if p not in given]
    if missing:
        raise UserError(f"--protocols {','.join(protocols)} with only --{next(iter(given))}-url: give "
                        f"--{missing[0]}-url too, or --protocols {','.join(given)}")
    return {p: given[p] for p in protocols}


@contextmanager
def served_target(args, ctx, log=print):
    """The servers, models and load generator the served stage needs, checked before anything is measured: the
    Triton at --http-url/--grpc-url (reachable) or one started on --repository (stopped on leaving), and at least
    one model of the checkpoint among its READY ones; the load generator is chosen (and named) first."""
    perf_analyzer, note = choose_load_generator(args.load_generator, args.perf_analyzer)
    log(note)
    urls, server = given_urls(args), None
    for protocol, url in urls.items():
        check_reachable(protocol, url)
    if not urls:
        mode, why = choose_server(args.server)
        log(f"starting Triton: {mode} ({why})")
        server = TritonServer(args.repository, mode).start()
    try:
        if server is not None:
            urls = {p: server.endpoints.http if p == "http" else server.endpoints.grpc
                    for p in args.protocols or PROTOCOLS}
        protocol, url = next(iter(urls.items()))
        ready = ready_models(url, protocol)
        cheap = {n: role for n, p in ready.items() if (role := cheap_role(p))}
        roles = model_roles(set(ready), ctx.fused_name, ctx.best_expert, ctx.num_experts, cheap)
        if not roles:
            raise UserError(f"no model of {ctx.ckpt} to measure at {url}: looked for {ctx.fused_name}, "
                            f"{ctx.fused_name}_naive and {ctx.fused_name}_expert0..{ctx.num_experts - 1}; the server "
                            f"has {', '.join(sorted(ready)) or 'no READY model'} (--model NAME: the served fused model)")
        yield ServedTarget(urls, ready, roles, perf_analyzer)
    finally:
        if server is not None:
            server.stop()
            server.cleanup()


def check_reachable(protocol: str, url: str) -> None:
    """UserError naming the flag when the server at `url` does not answer over `protocol`."""
    module = client_module(protocol)
    client = module.InferenceServerClient(url)
    try:
        ready = client.is_server_ready()
    except Exception as exc:  # noqa: BLE001 - connection errors differ per protocol and library version
        raise UserError(f"cannot reach Triton at {url} over {protocol} (--{protocol}-url): "
                        f"{str(exc).splitlines()[0][:160]}") from None
    finally:
        client.close()
    if not ready:
        raise UserError(f"Triton at {url} (--{protocol}-url) is not ready; wait for it or restart it")


def score_model(url: str, protocol: str, name: str, role: str, params: dict, ctx) -> dict:
    """Gate (random images, then the labelled set against in-process ONNX Runtime of the same experts and
    precision) and score one served model over one protocol."""
    precision = params.get("expertfuse_precision", "fp32")
    experts = served_experts(params, ctx.num_experts)
    early_exit = EarlyExit.of(params)
    in_process = ctx.inprocess_logits.get(reference_key(experts, precision, early_exit and early_exit.threshold))
    runner = TritonRunner(url, protocol, name)
    try:
        verdict = gate_and_score(runner, experts, precision, ctx.refs, ctx.data, batch=runner.max_batch(),
                                 labelled_reference=in_process, early_exit=early_exit)
    finally:
        runner.close()
    verdict.pop("logits", None)
    return {"model": name, "model_role": role, "protocol": protocol, "experts": list(experts), "precision": precision,
            **verdict}


def sweep_model(args, url: str, protocol: str, name: str, images: np.ndarray, workdir: Path | None,
                perf_analyzer) -> list[dict]:
    """The concurrency sweep of one served model on the evaluation images (either load generator)."""
    if perf_analyzer:
        return run_perf_analyzer(perf_analyzer, url, protocol, name, images, args.served_batch, args.concurrency,
                                 args.window_s, workdir)
    return [measure_point(url, protocol, name, images, args.served_batch, c, args.window_s,
                          max_processes=args.client_processes, client_kind=args.client) for c in args.concurrency]


def timing_key(m: dict) -> str:
    """A served model's name in the interleaved timing: its role, or for the cheaper roles, which can hold several
    models (INT8 single and ensemble, FP32 and INT8 early exit), its role and name."""
    role = m["model_role"]
    return f"{role}:{m['model']}" if role in ("int8", "early-exit") else role


def cheap_pairs(timed: list[dict], protocol: str) -> list[tuple[str, str, str]]:
    """(title, model, baseline) of every cheaper model: INT8 against its FP32 twin (the best expert or the fused
    ensemble), early exit against the fused ensemble."""
    pairs = []
    for m in timed:
        if m["protocol"] == protocol and m["model_role"] == "int8":
            pairs.append((f"int8 / fp32 ({m['model']})", timing_key(m), "single" if len(m["experts"]) == 1 else "fused"))
        elif m["protocol"] == protocol and m["model_role"] == "early-exit":
            pairs.append((f"early exit / ensemble ({m['model']})", timing_key(m), "fused"))
    return pairs


def served_interleave(args, urls: dict[str, str], timed: list[dict], ctx) -> tuple[list[dict], list[dict], str | None]:
    """One interleaved run at concurrency 1: every timed served model on every protocol, plus the in-process fused
    ensemble. Returns (ratios, cost points relative to the served best expert, why nothing was measured or None)."""
    runners = {f"{timing_key(m)}/{m['protocol']}": TritonRunner(urls[m["protocol"]], m["protocol"], m["model"],
                                                                  shared_memory=args.shared_memory) for m in timed}
    fused = next((m for m in timed if m["model_role"] == "fused"), None)
    if fused is not None and ctx.job is not None:
        variant = Variant("served-twin", tuple(fused["experts"]), ctx.fused_fusion)
        runners["fused/in-process"] = make_runner(ctx.runtime, ctx.job, variant, ctx.workdir)
    batch = args.served_batch
    try:
        inputs = {k: r.prepare_all(timing_batches(ctx.data.pixels, batch)) for k, r in runners.items()}
        timing = interleave(cycling_calls(runners, inputs), calls_per_block=5, budget_s=args.budget_s,
                            max_s=MAX_EXTENSION * args.budget_s)
    finally:
        for r in runners.values():
            r.close()
    if not timing.measured:
        return [], [], f"the served ratios and costs (interleaved at concurrency 1): {timing.not_measured}"
    ratios, points = [], []
    for protocol in urls:
        pairs = [("fused / naive", "fused", "naive"), ("served / in-process", "fused", "fused/in-process"),
                 ("ensemble / single", "fused", "single"), *cheap_pairs(timed, protocol)]
        for title, a, b in pairs:
            a_key, b_key = f"{a}/{protocol}", b if "/" in b else f"{b}/{protocol}"
            if a_key in runners and b_key in runners:
                name = title if title.startswith("served") else f"{title} (served)"
                ratios.append(ratio_row(name, timing, a_key, b_key, protocol=protocol, batch=batch))
        for m in timed:
            key, single = f"{timing_key(m)}/{protocol}", f"single/{protocol}"
            if m["protocol"] == protocol and single in runners:
                cost = ratio(timing, key, single).to_dict()
                points.append({"name": f"{m['model']} over {protocol}", "where": f"triton-{protocol}",
                               "experts": len(m["experts"]),
                               "experts_run": m["accuracy"].get("experts_run", float(len(m["experts"]))),
                               "precision": m["precision"], **accuracy_columns(m["accuracy"]),
                               f"cost_b{batch}": cost, "cost_small": cost["ratio"], "cost_large": None,
                               "cost_small_reliable": cost["reliable"], "summary": timing.summary(key, batch)})
    return ratios, points, None


def run_served(args, ctx, target: ServedTarget, log=print) -> dict:
    """Score every served model of the checkpoint, refuse the ones that disagree, then sweep and interleave the rest."""
    urls, perf_analyzer = target.urls, target.perf_analyzer
    workdir = Path(tempfile.mkdtemp(prefix="expertfuse-bench-")) if perf_analyzer else None  # its CSV files
    result = {"models": [], "sweep": [], "ratios": [], "points": [], "server_models": sorted(target.ready),
              "not_measured": []}
    try:
        for name, role in target.roles.items():
            for protocol, url in urls.items():
                row = score_model(url, protocol, name, role, target.ready[name], ctx)
                result["models"].append(row)
                if "refused" in row:
                    log(f"  {role:>7} {name:<16} {protocol:<4} REFUSED: {row['refused']} disagree with {ctx.ckpt}")
                    continue
                log(f"  {role:>7} {name:<16} {protocol:<4} top-1 {row['accuracy']['overall']:5.1f}%  "
                    f"few {row['accuracy']['few']:5.1f}%  agreement {row['accuracy']['agreement']:5.1f}%")
        timed = [m for m in result["models"] if "accuracy" in m and m["model_role"] in TIMED_ROLES]
        for m in timed:
            for point in sweep_model(args, urls[m["protocol"]], m["protocol"], m["model"], ctx.data.pixels,
                                     workdir, perf_analyzer):
                result["sweep"].append({**point, "model_role": m["model_role"]})
                figures = (f"{point['throughput']:8.1f} img/s  p99 {point.get('p99_ms', float('nan')):7.2f} ms"
                           if point.get("measured", True) else f"NOT MEASURED: {point['not_measured']}")
                log(f"  {m['model_role']:>7} {m['model']:<16} {m['protocol']:<4} c={point['concurrency']:<3} "
                    f"{figures}{'  (client-bound)' if point.get('client_bound') else ''}")
        if timed:
            result["ratios"], result["points"], why = served_interleave(args, urls, timed, ctx)
            result["not_measured"] += [why] if why else []
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return result

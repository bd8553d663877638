"""Served measurement: a concurrency sweep against Triton, the way perf_analyzer does it.

The load generator is perf_analyzer wherever a working binary is found (its CSV is parsed), else our own: fewer
client processes than cores, each running asyncio coroutines with one tritonclient aio connection per in-flight
request (or threads with one sync client each). Each point runs a warm-up, then fixed-duration windows; it reports
client p50/p90/p95/p99 latency and throughput, the server's queue / compute split and executions per request from
Triton's statistics API, and the client's CPU per request: a row whose figure the client set is `client_bound`.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import resource
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.measure.timed_images import timing_batches
from expertfuse.errors import UserError
from expertfuse.timing import windows_agree
from serve.protocols import client_module, image_inputs


def _requests(module, batches: list[np.ndarray]) -> list:
    """One request's inputs per image batch, built before the clock starts; the clients cycle through them."""
    return [[request] for request in image_inputs(module, batches)]


def _asyncio_loops(url: str, protocol: str, model: str, batches: list[np.ndarray], clients: int, schedule, ready, go,
                   records: list, errors: list) -> tuple[float, float, float]:
    """`clients` closed-loop coroutines, each with its own tritonclient asyncio client (http.aio or grpc.aio), so
    one connection per in-flight request, each cycling through the image batches from its own offset; each sends
    one warm-up request before the process reports ready. Returns usage_since(the first window's start) at the end
    of the last window."""
    import asyncio
    aio = client_module(protocol, asyncio=True)
    requests = _requests(aio, batches)
    outputs = [aio.InferRequestedOutput("logits")]

    async def loop(client, offset: int, stop_at: float) -> None:
        sent = offset
        while time.time() < stop_at:
            t0 = time.perf_counter()
            await client.infer(model, requests[sent % len(requests)], outputs=outputs)
            records.append((time.time(), time.perf_counter() - t0))
            sent += 1

    async def run() -> tuple[float, float, float]:
        used = (0.0, 0.0, 0.0)
        connections = [aio.InferenceServerClient(url) for _ in range(clients)]
        try:
            await asyncio.gather(*(c.infer(model, requests[0], outputs=outputs) for c in connections))
            ready.put(True)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            start_at, stop_at = schedule[:]
            await asyncio.sleep(max(0.0, start_at - time.time()))
            start = usage_now()
            spread = max(len(requests) // clients, 1)
            await asyncio.gather(*(loop(c, i * spread, stop_at) for i, c in enumerate(connections)))
            used = usage_since(start)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the point
            errors.append(str(exc).splitlines()[0])
            ready.put(True)  # the parent is not left waiting; it reads the error
        finally:
            for c in connections:
                await c.close()
        return used

    return asyncio.run(run())


def _load_worker(url: str, protocol: str, model: str, batches: list[np.ndarray], threads: int, schedule, ready, go,
                 results, client_kind: str = "asyncio") -> None:
    """One client process: `threads` closed-loop clients (asyncio coroutines, or threads with sync clients). Each
    connects and sends one warm-up request, then the process reports ready and waits for the parent's `go`; the
    clients then run from schedule[0] to schedule[1] and the process sends its (end time, latency) pairs and CPU
    time to the parent. Start-up (imports, connections) thus never falls inside a measurement window."""
    records, errors = [], []
    if client_kind == "asyncio":
        cpu, busiest, wall = _asyncio_loops(url, protocol, model, batches, threads, schedule, ready, go, records,
                                            errors)
        results.put({"records": records, "errors": errors, "cpu_s": cpu, "busiest_thread_s": busiest, "wall_s": wall})
        return
    module = client_module(protocol)
    warmed, released = threading.Barrier(threads + 1), threading.Event()

    requests = _requests(module, batches)
    spread = max(len(requests) // threads, 1)

    def loop(offset: int) -> None:
        client = module.InferenceServerClient(url)
        outputs = [module.InferRequestedOutput("logits")]
        sent = offset
        try:
            try:
                client.infer(model, requests[0], outputs=outputs)  # connected and warm before any window opens
            finally:
                warmed.wait()
            released.wait()
            start_at, stop_at = schedule[:]
            while time.time() < start_at:
                time.sleep(0.001)
            while time.time() < stop_at:
                t0 = time.perf_counter()
                client.infer(model, requests[sent % len(requests)], outputs=outputs)
                records.append((time.time(), time.perf_counter() - t0))
                sent += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the point
            errors.append(str(exc).splitlines()[0])
        finally:
            client.close()

    workers = [threading.Thread(target=loop, args=(i * spread,)) for i in range(threads)]
    for w in workers:
        w.start()
    warmed.wait()
    ready.put(True)
    go.wait()
    start_at, stop_at = schedule[:]
    released.set()
    time.sleep(max(0.0, start_at - time.time()))
    start = usage_now()
    time.sleep(max(0.0, stop_at - time.time()))
    cpu, busiest, wall = usage_since(start)  # while the clients' threads still exist
    for w in workers:
        w.join()
    results.put({"records": records, "errors": errors, "cpu_s": cpu, "busiest_thread_s": busiest, "wall_s": wall})


def thread_demand_ns() -> dict[int, int]:
    """Per thread of this process: nanoseconds on a core plus waiting in a run queue for one (Linux schedstat;
    {} where it is missing). A thread near 100% of the wall time could not have run more."""
    demand = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            on_cpu, waiting, _ = (int(v) for v in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        demand[int(task.name)] = on_cpu + waiting
    return demand


def usage_now() -> tuple[float, float, dict[int, int]]:
    return time.monotonic(), time.process_time(), thread_demand_ns()


def usage_since(start: tuple[float, float, dict[int, int]]) -> tuple[float, float, float]:
    """(process CPU seconds, the busiest thread's seconds on or waiting for a core, wall seconds) since `start`
    (usage_now): one interval for all three, so a thread's share of the wall time cannot pass 1."""
    wall0, cpu0, demand0 = start
    demand = thread_demand_ns()
    busiest = max((demand[t] - demand0[t] for t in demand if t in demand0), default=0)
    return time.process_time() - cpu0, busiest / 1e9, time.monotonic() - wall0


@contextmanager
def load_processes_starting():
    """While the load processes start: SIGINT ignored, so that they inherit it ignored (Ctrl-C at the terminal reaches
    the whole process group, and only the parent should act on it: it stops them); and a SIGTERM held back until
    every child has its arguments (its image batches go through a pipe, and a stop that cut that write short would
    leave a child unpickling half of them, a traceback on the terminal, or started and never stopped). A SIGTERM
    held back here is raised again on leaving, where the caller stops every child it started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held[:1]:
            signal.raise_signal(signum)


def server_statistics(url: str, protocol: str, model: str) -> dict:
    module = client_module(protocol)
    client = module.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model)
    finally:
        client.close()
    if protocol == "grpc":
        from google.protobuf.json_format import MessageToDict
        stats = MessageToDict(stats, preserving_proto_field_name=True)
    s = stats["model_stats"][0]
    inf = s.get("inference_stats", {})
    ns = lambda key: int(inf.get(key, {}).get("ns", 0))  # noqa: E731
    count = lambda key: int(inf.get(key, {}).get("count", 0))  # noqa: E731
    return {"inference_count": int(s.get("inference_count", 0)), "execution_count": int(s.get("execution_count", 0)),
            "success_count": count("success"), "queue_ns": ns("queue"), "compute_input_ns": ns("compute_input"),
            "compute_infer_ns": ns("compute_infer"), "compute_output_ns": ns("compute_output")}


MAX_WARMUP_S = 0.5  # closed-loop clients on warm connections reach their steady rate within milliseconds
READY_TIMEOUT_S = 120  # for every load process to import tritonclient, connect and complete a warm-up request
MIN_WINDOW_REQUESTS = 5  # a window with fewer completed requests measured nothing worth a throughput


def measure_concurrency(url: str, protocol: str, model: str, images: np.ndarray, batch: int, concurrency: int,
                        window_s: float = 1.0, windows: int = 3, warmup_s: float | None = None,
                        max_processes: int | None = None, tolerance: float = 0.1, client_kind: str = "asyncio") -> dict:
    """One point of the sweep, requests of `batch` images cycling through `images` (uint8 NHWC: the timed sample,
    bench.measure.timed_images), after a warm-up of `warmup_s` (default: one window, at most MAX_WARMUP_S; every
    connection has already had its own warm-up request). Raises RuntimeError when requests fail."""
    warmup_s = min(window_s, MAX_WARMUP_S) if warmup_s is None else warmup_s
    batches = timing_batches(images, batch)
    processes = max(1, min(concurrency, max_processes or default_client_processes()))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    ctx = mp.get_context("spawn")
    results, ready, go, schedule = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Array("d", 2)
    procs = [ctx.Process(target=_load_worker,
                         args=(url, protocol, model, batches[i::processes] or batches, n, schedule, ready, go, results,
                               client_kind))
             for i, n in enumerate(shares)]
    try:
        with load_processes_starting():
            for p in procs:
                p.start()
        try:
            for _ in procs:  # every client imported, connected and warmed up: only then the clock starts
                ready.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(f"{model} over {protocol}: the load processes were not ready (imported, connected, "
                               f"one request answered) within {READY_TIMEOUT_S} s") from None
        before = server_statistics(url, protocol, model)
        start_at = time.time() + 0.1
        measured_from = start_at + warmup_s
        stop_at = measured_from + windows * window_s
        schedule[:] = [start_at, stop_at]
        go.set()
        reports = [results.get(timeout=stop_at - time.time() + 120) for _ in procs]
    finally:  # Ctrl-C, SIGTERM or a failed point: no load process outlives the point
        for p in procs:
            if p.pid is not None:
                p.terminate()
                p.join()
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{model} over {protocol}: {errors[0]}")
    records = sorted(rec for r in reports for rec in r["records"] if rec[0] >= measured_from)
    counts = [sum(1 for end, _ in records if measured_from + w * window_s <= end < measured_from + (w + 1) * window_s)
              for w in range(windows)]
    latencies = np.array([lat for _, lat in records]) * 1e3
    cpu_share = [r["cpu_s"] / r["wall_s"] for r in reports]
    thread_share = [r["busiest_thread_s"] / r["wall_s"] for r in reports]
    figures = window_figures(counts, list(latencies), batch, window_s, tolerance)
    row = {"model": model, "protocol": protocol, "concurrency": concurrency, "batch": batch, "client": client_kind,
           "load_generator": "python", **figures,
           **({"mean_ms": float(latencies.mean())} if figures["measured"] else {}),
           "requests": len(records), "client_processes": processes, "client_cpu_share": cpu_share,
           "client_busiest_thread_share": thread_share,
           "client_cpu_ms": sum(r["cpu_s"] for r in reports) / max(sum(len(r["records"]) for r in reports), 1) * 1e3,
           **(server_split(before, server_statistics(url, protocol, model)) if figures["measured"] else {})}
    return with_client_bound(row)


def server_split(before: dict, after: dict) -> dict:
    """Per request, from two snapshots of Triton's statistics: executions (below 1: dynamic batching), queue and
    compute milliseconds."""
    delta = {k: after[k] - before[k] for k in after}
    requests = max(delta["success_count"], 1)
    return {"server_exec_per_request": delta["execution_count"] / requests,
            "server_queue_ms": delta["queue_ns"] / requests / 1e6,
            "server_compute_ms": (delta["compute_input_ns"] + delta["compute_infer_ns"] + delta["compute_output_ns"])
            / requests / 1e6}


def window_figures(counts: list[int], latencies_ms: list[float], batch: int, window_s: float,
                   tolerance: float = 0.1) -> dict:
    """Throughput, latency percentiles and stability from each window's completed requests, or, when a window
    completed fewer than MIN_WINDOW_REQUESTS, none of them: measured false and why (a figure from a window that
    caught 0 or 2 requests would pass a stall for a measurement)."""
    window_throughputs = [c * batch / window_s for c in counts]
    if not counts or min(counts) < MIN_WINDOW_REQUESTS:
        return {"measured": False, "stable": False, "window_s": window_s, "window_throughputs": window_throughputs,
                "not_measured": f"a {window_s:g} s window completed {min(counts, default=0)} requests (at least "
                                f"{MIN_WINDOW_REQUESTS} needed): lengthen --window-s"}
    return {"measured": True, "stable": windows_agree([float(c) for c in counts], tolerance), "window_s": window_s,
            "window_throughputs": window_throughputs, "throughput": sum(counts) * batch / (len(counts) * window_s),
            **{f"p{q}_ms": float(np.percentile(latencies_ms, q)) for q in (50, 90, 95, 99)}}


def best_under(rows: list[dict], budget_ms: float) -> dict | None:
    """Highest throughput among the points whose p99 is within the budget."""
    within = [r for r in rows if "p99_ms" in r and r["p99_ms"] <= budget_ms]
    return max(within, key=lambda r: r["throughput"], default=None)


MAX_WINDOW_GROWTH = 8  # a point whose windows caught too few requests is remeasured with windows up to 8 x as long


def measure_point(url: str, protocol: str, model: str, images: np.ndarray, batch: int, concurrency: int,
                  window_s: float = 1.0, log=print, **kwargs) -> dict:
    """measure_concurrency, remeasured with windows twice as long while a window completes too few requests, up to
    MAX_WINDOW_GROWTH x `window_s`; the last try is returned (not measured if it is still short)."""
    longest = window_s * MAX_WINDOW_GROWTH
    while True:
        row = measure_concurrency(url, protocol, model, images, batch, concurrency, window_s, **kwargs)
        if row["measured"] or window_s >= longest:
            return row
        log(f"  {model} over {protocol} c={concurrency}: {row['not_measured'].split(':')[0]}; "
            f"remeasuring with {min(2 * window_s, longest):g} s windows")
        window_s = min(2 * window_s, longest)


SATURATED_SHARE = 0.9  # a client process busier than this (share of one core) cannot send faster
IN_FLIGHT_SHORTFALL = 0.9  # fewer requests in flight on average than this share of the concurrency asked for
CLIENT_CPU_SHARE = 0.1  # client CPU per request above this share of the server's compute per request


def with_client_bound(row: dict) -> dict:
    """The row with `client_bound` (and `client_bound_why` when true): the load generator, not the server, set the
    figure, which then understates the server by a client-dependent amount, so a client-bound row never feeds a
    ratio. Three signs: a client process used a whole core, or one of its threads was on a core or waiting in the
    run queue for one nearly all the time (on a loaded machine the event loop starves before it burns a core); fewer
    requests were in flight on average (Little's law: throughput x mean latency) than the concurrency asked for, so
    the client spent the rest between requests; or the client's CPU per request exceeds 10% of the server's compute
    per request (one execution's compute shared by the requests batched into it): time the client adds to every
    request, and takes from cores it shares with the server, beyond the 10% the figures are compared at. On a
    2-core machine with the tiny test models this flags perf_analyzer too at some points, and our Python client at
    nearly all (bench/results/served-vs-perf-analyzer)."""
    why = None
    in_flight = row["throughput"] / row["batch"] * row["mean_ms"] / 1e3 if row.get("mean_ms") else None
    work_ms = (row.get("server_compute_ms") or 0.0) * min(row.get("server_exec_per_request") or 1.0, 1.0)
    if max(row.get("client_cpu_share") or [0.0]) > SATURATED_SHARE:
        why = f"a client process used {max(row['client_cpu_share']):.0%} of a core"
    elif max(row.get("client_busiest_thread_share") or [0.0]) > SATURATED_SHARE:
        why = (f"a client thread was on a core or waiting for one {max(row['client_busiest_thread_share']):.0%} "
               "of the time")
    elif in_flight is not None and in_flight < IN_FLIGHT_SHORTFALL * row["concurrency"]:
        why = (f"{in_flight:.2f} requests in flight on average (throughput x mean latency) of the "
               f"{row['concurrency']} asked for: the client spent the rest between requests")
    elif row.get("client_cpu_ms") is not None and work_ms and row["client_cpu_ms"] > CLIENT_CPU_SHARE * work_ms:
        why = (f"the client spent {row['client_cpu_ms']:.3f} ms of CPU per request, more than {CLIENT_CPU_SHARE:.0%} "
               f"of the server's {work_ms:.3f} ms of compute per request")
    return {**row, "client_bound": why is not None, **({"client_bound_why": why} if why else {})}


def feeds_ratios(row: dict) -> bool:
    """Whether a sweep row may feed a ratio or a comparison: it measured something, and the server, not the load
    generator, set its figure."""
    return row.get("measured", True) and not row.get("client_bound")


def default_client_processes() -> int:
    """Fewer load processes than cores, so the cores left serve (one on a 2-core machine; asyncio keeps many
    requests in flight per process)."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


PERF_ANALYZER_ENV = "PERF_ANALYZER"  # a perf_analyzer binary's path, when it is not on PATH


def find_perf_analyzer(given: str | None = None) -> tuple[str | None, str]:
    """(a working perf_analyzer binary or None, why not / which one). Looked for at `given` (--perf-analyzer), then
    $PERF_ANALYZER, then on PATH; it works when `--version` answers 'Perf Analyzer' (pip's perf-analyzer 0.1.0 on
    glibc < 2.38 is a placeholder without a binary, and a binary missing its libraries fails to start)."""
    source, path = next(((s, p) for s, p in (("--perf-analyzer", given), (f"${PERF_ANALYZER_ENV}",
                         os.environ.get(PERF_ANALYZER_ENV)), ("PATH", shutil.which("perf_analyzer"))) if p),
                        (None, None))
    if path is None:
        return None, f"no perf_analyzer on PATH (nor --perf-analyzer, ${PERF_ANALYZER_ENV})"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"perf_analyzer from {source} ({path}) does not run: {str(exc).splitlines()[0]}"
    said = (out.stdout + out.stderr).strip()
    if out.returncode == 0 and "Perf Analyzer" in said:
        return path, f"{said.splitlines()[0]} ({path}, from {source})"
    first = said.splitlines()[0][:160] if said else f"exit {out.returncode}"
    return None, f"perf_analyzer from {source} ({path}) is not a working binary: {first}"


def choose_load_generator(requested: str, given: str | None = None) -> tuple[str | None, str]:
    """(perf_analyzer binary or None for the Python generator, a one-line note saying which and why). 'auto' takes
    perf_analyzer wherever a working one is found; 'perf_analyzer' without one is a UserError."""
    if requested == "python":
        return None, "load generator: python (--load-generator python)"
    binary, why = find_perf_analyzer(given)
    if binary:
        return binary, f"load generator: {why}"
    if requested == "perf_analyzer":
        raise UserError(f"--load-generator perf_analyzer: {why} (see README, bench: a perf_analyzer on glibc < 2.38)")
    return None, f"load generator: python ({why})"


def parse_perf_analyzer_csv(text: str) -> list[dict]:
    """perf_analyzer's -f CSV (--verbose-csv adds the mean latency): times in microseconds, rows sorted by
    throughput. Returns rows by concurrency, in ms."""
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        us = lambda key: float(r[key]) / 1e3 if r.get(key) not in (None, "") else None  # noqa: E731
        rows.append({"concurrency": int(r["Concurrency"]), "throughput": float(r["Inferences/Second"]),
                     "p50_ms": us("p50 latency"), "p90_ms": us("p90 latency"), "p95_ms": us("p95 latency"),
                     "p99_ms": us("p99 latency"), "mean_ms": us("Avg latency"), "server_queue_ms": us("Server Queue"),
                     "server_compute_ms": sum(us(k) or 0 for k in ("Server Compute Input", "Server Compute Infer",
                                                                    "Server Compute Output")),
                     "client_send_ms": us("Client Send"), "client_recv_ms": us("Client Recv")})
    return sorted(rows, key=lambda r: r["concurrency"])


PERF_ANALYZER_STABILITY = 10  # %, perf_analyzer's own default for 3 consecutive windows
PERF_ANALYZER_UNCHECKED = 10_000  # %: a stability bound no three windows miss, i.e. the check off
PERF_ANALYZER_TRIALS = 5  # windows before a level counts as unstable (perf_analyzer needs 3 that agree)


def run_perf_analyzer(binary: str, url: str, protocol: str, model: str, images: np.ndarray, batch: int,
                      concurrencies: list[int], window_s: float, workdir: Path) -> list[dict]:
    """One perf_analyzer run per listed concurrency (a start:end:step range would run other levels than 1,4,16),
    with its CPU time (getrusage of children) and the server's statistics around it for `client_bound`."""
    return [perf_analyzer_point(binary, url, protocol, model, images, batch, level, window_s, workdir)
            for level in concurrencies]


def perf_analyzer_input_data(images: np.ndarray, batch: int, workdir: Path) -> Path:
    """perf_analyzer's --input-data JSON: the timed sample (bench.measure.timed_images), one batch-1 entry per image
    (base64 of its bytes), which perf_analyzer sends round-robin, so it drives the model with the images our own
    generator sends instead of one random tensor reused for every request. Named by its content and written once
    per run folder, however many levels and rounds send it."""
    timed = np.ascontiguousarray(np.concatenate(timing_batches(images, batch)))
    path = workdir / f"perf_images_{hashlib.sha1(timed.tobytes()).hexdigest()[:16]}.json"
    if not path.exists():
        entries = [{"image": {"b64": base64.b64encode(image.tobytes()).decode()}} for image in timed]
        path.write_text(json.dumps({"data": entries}))
    return path


def perf_analyzer_point(binary: str, url: str, protocol: str, model: str, images: np.ndarray, batch: int,
                        concurrency: int, window_s: float, workdir: Path) -> dict:
    """One concurrency level. A level perf_analyzer cannot stabilize within its trials is rerun once with the
    stability check off (-s PERF_ANALYZER_UNCHECKED) and recorded stable: False, as the Python generator records it."""
    out = workdir / f"perf_{model}_{protocol}_c{concurrency}.csv"
    data = perf_analyzer_input_data(images, batch, workdir)
    for stability in (PERF_ANALYZER_STABILITY, PERF_ANALYZER_UNCHECKED):
        before, cpu0 = server_statistics(url, protocol, model), children_cpu_s()
        done = subprocess.run([binary, "-m", model, "-u", url, "-i", protocol, "-b", str(batch),
                               "--input-data", str(data), "--concurrency-range", f"{concurrency}:{concurrency}",
                               "--measurement-interval", str(int(window_s * 1000)), "-s", str(stability),
                               "-r", str(PERF_ANALYZER_TRIALS), "--verbose-csv", "-f", str(out)],
                              capture_output=True, text=True, timeout=600)
        cpu, after = children_cpu_s() - cpu0, server_statistics(url, protocol, model)
        if done.returncode == 0:
            break
        if "stable" not in done.stdout + done.stderr or stability == PERF_ANALYZER_UNCHECKED:
            said = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[-1]
            raise RuntimeError(f"{model} over {protocol}: perf_analyzer failed at concurrency {concurrency}: {said}")
    [row] = parse_perf_analyzer_csv(out.read_text())
    requests = max(after["success_count"] - before["success_count"], 1)
    return with_client_bound({"model": model, "protocol": protocol, "batch": batch, "client": "perf_analyzer",
                              "load_generator": "perf_analyzer", **row, "measured": True, "window_s": window_s,
                              "stable": stability == PERF_ANALYZER_STABILITY, "client_cpu_ms": cpu / requests * 1e3,
                              "server_exec_per_request": server_split(before, after)["server_exec_per_request"]})


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (perf_analyzer runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

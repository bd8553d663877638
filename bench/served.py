"""Served measurement: a concurrency sweep against Triton, the way perf_analyzer does it.

Load comes from several client processes (inside each, threads with one sync client per thread, or
asyncio coroutines on tritonclient's aio clients) so the Python client is not the bottleneck; when a client process is nearly saturated the row says so. Each point
runs a warm-up, then fixed-duration windows; it reports client p50/p90/p95/p99 latency and throughput,
plus the server's queue / compute split and executions per request from Triton's statistics API.
A working perf_analyzer binary can be the load generator instead (its CSV is parsed).
"""
from __future__ import annotations

import csv
import io
import multiprocessing as mp
import queue
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from expertfuse.timing import windows_agree
from serve.protocols import client_module


def _asyncio_loops(url: str, protocol: str, model: str, images: np.ndarray, clients: int, start_at: float,
                   stop_at: float, records: list, errors: list) -> None:
    """`clients` closed-loop coroutines on one tritonclient asyncio client (http.aio or grpc.aio)."""
    import asyncio
    aio = client_module(protocol, asyncio=True)

    async def run() -> None:
        client = aio.InferenceServerClient(url)
        request = aio.InferInput("image", list(images.shape), "UINT8")
        request.set_data_from_numpy(images)
        outputs = [aio.InferRequestedOutput("logits")]

        async def loop() -> None:
            while time.time() < stop_at:
                t0 = time.perf_counter()
                await client.infer(model, [request], outputs=outputs)
                records.append((time.time(), time.perf_counter() - t0))
        try:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            await asyncio.gather(*(loop() for _ in range(clients)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the point
            errors.append(str(exc).splitlines()[0])
        finally:
            await client.close()

    asyncio.run(run())


def _load_worker(url: str, protocol: str, model: str, images: np.ndarray, threads: int, schedule, ready, go,
                 results, client_kind: str = "threads") -> None:
    """One client process: `threads` closed-loop clients (threads with sync clients, or asyncio coroutines). Each
    connects and sends one warm-up request, then the process reports ready and waits for the parent's `go`; the
    clients then run from schedule[0] to schedule[1] and the process sends its (end time, latency) pairs and CPU
    time to the parent. Start-up (imports, connections) thus never falls inside a measurement window."""
    module = client_module(protocol)
    records, errors = [], []
    if client_kind == "asyncio":
        ready.put(True)
        go.wait()
        start_at, stop_at = schedule[:]
        cpu0 = time.process_time()
        _asyncio_loops(url, protocol, model, images, threads, start_at, stop_at, records, errors)
        results.put({"records": records, "errors": errors, "cpu_s": time.process_time() - cpu0,
                     "wall_s": stop_at - start_at})
        return
    warmed, released = threading.Barrier(threads + 1), threading.Event()

    def loop() -> None:
        client = module.InferenceServerClient(url)
        request = module.InferInput("image", list(images.shape), "UINT8")
        request.set_data_from_numpy(images)
        outputs = [module.InferRequestedOutput("logits")]
        try:
            try:
                client.infer(model, [request], outputs=outputs)  # connected and warm before any window opens
            finally:
                warmed.wait()
            released.wait()
            start_at, stop_at = schedule[:]
            while time.time() < start_at:
                time.sleep(0.001)
            while time.time() < stop_at:
                t0 = time.perf_counter()
                client.infer(model, [request], outputs=outputs)
                records.append((time.time(), time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the point
            errors.append(str(exc).splitlines()[0])
        finally:
            client.close()

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    warmed.wait()
    ready.put(True)
    go.wait()
    cpu0 = time.process_time()
    released.set()
    for w in workers:
        w.join()
    cpu = time.process_time() - cpu0
    start_at, stop_at = schedule[:]
    results.put({"records": records, "errors": errors, "cpu_s": cpu, "wall_s": stop_at - start_at})


@contextmanager
def terminal_signals_ignored():
    """Processes started meanwhile inherit an ignored SIGINT (Python keeps it ignored): Ctrl-C at the terminal
    reaches the whole process group, and only the parent should act on it (it stops the load processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


READY_TIMEOUT_S = 120  # for every load process to import tritonclient, connect and complete a warm-up request
MIN_WINDOW_REQUESTS = 5  # a window with fewer completed requests measured nothing worth a throughput


def measure_concurrency(url: str, protocol: str, model: str, image_size: int, batch: int, concurrency: int,
                        window_s: float = 1.0, windows: int = 3, warmup_s: float = 0.5, max_processes: int = 4,
                        tolerance: float = 0.1, client_kind: str = "threads") -> dict:
    """One point of the sweep. Raises RuntimeError when requests fail."""
    images = np.random.RandomState(concurrency).randint(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    processes = max(1, min(concurrency, max_processes))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    ctx = mp.get_context("spawn")
    results, ready, go, schedule = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Array("d", 2)
    procs = [ctx.Process(target=_load_worker,
                         args=(url, protocol, model, images, n, schedule, ready, go, results, client_kind))
             for n in shares]
    try:
        with terminal_signals_ignored():
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
    after = server_statistics(url, protocol, model)
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{model} over {protocol}: {errors[0]}")
    records = sorted(rec for r in reports for rec in r["records"] if rec[0] >= measured_from)
    counts = [sum(1 for end, _ in records if measured_from + w * window_s <= end < measured_from + (w + 1) * window_s)
              for w in range(windows)]
    delta = {k: after[k] - before[k] for k in after}
    requests = max(delta["success_count"], 1)
    cpu_share = [r["cpu_s"] / r["wall_s"] for r in reports]
    figures = window_figures(counts, [lat * 1e3 for _, lat in records], batch, window_s, tolerance)
    server = {"server_exec_per_request": delta["execution_count"] / requests,
              "server_queue_ms": delta["queue_ns"] / requests / 1e6,
              "server_compute_ms": (delta["compute_input_ns"] + delta["compute_infer_ns"] + delta["compute_output_ns"])
              / requests / 1e6} if figures["measured"] else {}
    return {"model": model, "protocol": protocol, "concurrency": concurrency, "batch": batch, "client": client_kind,
            **figures, "requests": len(records), "client_processes": processes,
            "client_cpu_share": cpu_share, "client_bound": max(cpu_share) > 0.9, **server}


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


MAX_WINDOW_GROWTH = 8  # a point whose windows caught too few requests is remeasured with windows up to 8 x as long


def measure_point(url: str, protocol: str, model: str, image_size: int, batch: int, concurrency: int,
                  window_s: float = 1.0, log=print, **kwargs) -> dict:
    """measure_concurrency, remeasured with windows twice as long while a window completes too few requests, up to
    MAX_WINDOW_GROWTH x `window_s`; the last try is returned (not measured if it is still short)."""
    longest = window_s * MAX_WINDOW_GROWTH
    while True:
        row = measure_concurrency(url, protocol, model, image_size, batch, concurrency, window_s, **kwargs)
        if row["measured"] or window_s >= longest:
            return row
        log(f"  {model} over {protocol} c={concurrency}: {row['not_measured'].split(':')[0]}; "
            f"remeasuring with {min(2 * window_s, longest):g} s windows")
        window_s = min(2 * window_s, longest)


def find_perf_analyzer() -> str | None:
    """A working perf_analyzer binary, or None (the 0.1.0 'perf-analyzer' PyPI placeholder ships none)."""
    path = shutil.which("perf_analyzer")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if out.returncode == 0 and "Perf Analyzer" in (out.stdout + out.stderr) else None


def parse_perf_analyzer_csv(text: str) -> list[dict]:
    """perf_analyzer's -f CSV: times in microseconds, rows sorted by throughput. Returns rows by concurrency, in ms."""
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        us = lambda key: float(r[key]) / 1e3 if r.get(key) not in (None, "") else None  # noqa: E731
        rows.append({"concurrency": int(r["Concurrency"]), "throughput": float(r["Inferences/Second"]),
                     "p50_ms": us("p50 latency"), "p90_ms": us("p90 latency"), "p95_ms": us("p95 latency"),
                     "p99_ms": us("p99 latency"), "server_queue_ms": us("Server Queue"),
                     "server_compute_ms": sum(us(k) or 0 for k in ("Server Compute Input", "Server Compute Infer",
                                                                    "Server Compute Output")),
                     "client_send_ms": us("Client Send"), "client_recv_ms": us("Client Recv")})
    return sorted(rows, key=lambda r: r["concurrency"])


def run_perf_analyzer(binary: str, url: str, protocol: str, model: str, batch: int, concurrencies: list[int],
                      window_s: float, workdir: Path) -> list[dict]:
    """One perf_analyzer run per listed concurrency (a start:end:step range would run other levels than 1,4,16)."""
    rows = []
    for level in concurrencies:
        out = workdir / f"perf_{model}_{protocol}_c{level}.csv"
        subprocess.run([binary, "-m", model, "-u", url, "-i", protocol, "-b", str(batch),
                        "--concurrency-range", f"{level}:{level}", "--measurement-interval", str(int(window_s * 1000)),
                        "-s", "25", "-f", str(out)], check=True, capture_output=True, timeout=600)
        rows += [{"model": model, "protocol": protocol, "batch": batch, "load_generator": "perf_analyzer", **r}
                 for r in parse_perf_analyzer_csv(out.read_text())]
    return rows

"""A small model served by `surgery serve` against a bare uvicorn + FastAPI app, in one run.

The quickstart model (the shipped `quickstart` recipe: a tiny ResNet on 16x16 greyscale, forward
about 1 ms) answers `examples/digit-3.png` posted as `image/png`:

- served: `surgery serve BUNDLE` as a user runs it (HAProxy ingress, `serve.replicas: auto`,
  dynamic batching), at `/v1/models/quickstart:predict`;
- bare: one uvicorn process with one FastAPI route doing the same PNG decode, the same
  preprocessing (`surgery.preprocess`) and the same forward under `inference_mode`, answering
  the outputs as JSON.

Both servers run side by side; the load generator alternates between them in rounds, so a busy
spell of this shared machine lands on both. It is `wrk` (C, a few microseconds per request;
`benchmarks/wrkload.py`) where it is installed, else `benchmarks/loadgen.py` (Python, keep-alive
connections, prepared requests: about 0.05 ms of CPU per request, which on 2 cores is still a
client measuring itself a little); `--client lean|httpx` picks one of those (httpx: 2-3 ms per
request, most of a core taken from the servers). Any answer but 2xx (or a socket error) voids a
wrk measurement loudly. The one-client p50 phase always uses the lean client (one request at a
time, alternating between the servers, reading `Server-Timing`). Reported: requests/s at 32 clients
(target: served >= 1.0x bare), p50 at one client (target: served <= bare + 3 ms), the batch sizes
the replicas formed, and where a served request's time goes (`Server-Timing`, medians).

`--runtime` picks what runs the model in the replicas (`surgery serve --runtime`: auto, torch,
onnxruntime, onnxruntime-int8; the bundle carries `model.onnx`, and `model.int8.onnx` for int8,
quantized with calibration on the digits and its parity gate opened with `quantize_max_drop: 1`:
the weights are random, so only the speed means something). The bare app stays eager torch.

    python benchmarks/serve_small.py [--seconds 8] [--rounds 3] [--clients 32] [--client wrk|lean|httpx] [--runtime auto|torch|onnxruntime|onnxruntime-int8]

Reports; asserts nothing. About 2 minutes (`--seconds 3 --rounds 1 --requests 40`: under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "digit-3.png"
PNG = {"content-type": "image/png"}

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402  (benchmarks/loadgen.py)
import wrkload  # noqa: E402  (benchmarks/wrkload.py)

BARE_APP = """
import io, sys
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
import uvicorn
from surgery.bundle import load_bundle
from surgery.preprocess import image_eval_transform

if sys.argv[3] != "default":
    torch.set_num_threads(int(sys.argv[3]))
loaded = load_bundle(sys.argv[1])
model, transform = loaded.model.eval(), image_eval_transform(loaded.input_spec)
app = FastAPI()

@app.post("/predict")
async def predict(request: Request):
    image = Image.open(io.BytesIO(await request.body()))
    image.load()
    with torch.inference_mode():
        out = model(transform(image)[None])
    return JSONResponse({name: value[0].tolist() for name, value in out.items()})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_quickstart(root: Path, runtime: str = "auto") -> Path:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe

    recipe = load_recipe("quickstart")
    if runtime == "onnxruntime-int8":  # random weights: the gate's accuracy means nothing here
        recipe.export.quantize, recipe.export.quantize_max_drop = "int8", 1.0
    formats = ["safetensors", "onnx"]  # every runtime --runtime may ask for
    return export_bundle(build_model(recipe, load_weights=False), recipe, root / "quickstart", formats=formats)


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    body = IMAGE.read_bytes()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode})")
        try:
            if httpx.post(url, content=body, headers={"content-type": "image/png"}, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not come up")


def lean_load(url: str, body: bytes, clients: int, seconds: float) -> float:
    """Requests/s with `clients` keep-alive connections for `seconds` (benchmarks/loadgen.py)."""
    return loadgen.load(url, [body], PNG, clients, seconds)[0]


def throughput(client: str, url: str, body: bytes, clients: int, seconds: float) -> float:
    """Requests/s with `clients` connections for `seconds`, on the chosen load generator."""
    if client == "wrk":
        return wrkload.load(url, [body], PNG, clients, seconds).rps
    if client == "lean":
        return lean_load(url, body, clients, seconds)
    return asyncio.run(load(url, body, clients, seconds))


async def lean_latencies(
    urls: dict[str, str], body: bytes, n: int
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """`latencies` with one keep-alive connection per server (benchmarks/loadgen.py)."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    phases: list[dict[str, float]] = []
    async with contextlib.AsyncExitStack() as stack:
        connections = {name: await stack.enter_async_context(loadgen.Connection(url)) for name, url in urls.items()}
        requests = {name: c.request(body, PNG) for name, c in connections.items()}
        for _ in range(n):
            for name, connection in connections.items():
                start = time.perf_counter()
                status, headers, answer = await connection.send(requests[name])
                times[name].append(time.perf_counter() - start)
                if status != 200:
                    raise loadgen.LoadError(f"HTTP {status}: {answer[:200]!r}")
                if "server-timing" in headers:
                    phases.append(server_timing(headers["server-timing"]))
    return times, phases


def server_timing(header: str) -> dict[str, float]:
    return {k.strip(): float(v) for k, v in (p.split(";dur=") for p in header.split(","))}


async def load(url: str, body: bytes, clients: int, seconds: float) -> float:
    """Requests/s with `clients` concurrent httpx clients for `seconds`."""
    import httpx

    done = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                r = await client.post(url, content=body, headers={"content-type": "image/png"})
                r.raise_for_status()
                done += 1

        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return done / (time.perf_counter() - begin)


async def latencies(urls: dict[str, str], body: bytes, n: int) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Seconds per request at one client, alternating between the servers; and the served
    requests' `Server-Timing` phases."""
    import httpx

    times: dict[str, list[float]] = {name: [] for name in urls}
    phases: list[dict[str, float]] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(n):
            for name, url in urls.items():
                start = time.perf_counter()
                r = await client.post(url, content=body, headers={"content-type": "image/png"})
                times[name].append(time.perf_counter() - start)
                r.raise_for_status()
                if "server-timing" in r.headers:
                    phases.append(server_timing(r.headers["server-timing"]))
    return times, phases


def replica_stats(stats_url: str) -> tuple[Counter, set[str]]:
    """The batch sizes every replica formed, and what each gives a lone request (each `stats`
    request reaches one replica: ask until the same replicas keep answering)."""
    import httpx

    seen: dict[int, dict[str, Any]] = {}
    for _ in range(40):
        stats = httpx.get(stats_url, timeout=30).json()
        seen[stats["rows_decoded"]] = stats
    total: Counter = Counter()
    for stats in seen.values():
        total.update(stats["batch_sizes"])
    solo = {
        f"{s.get('runtime')} ({s.get('runtime_reason')}), {s.get('solo_threads')} threads "
        f"(timed, ms: {s.get('solo_timing_ms')})"
        for s in seen.values()
    }
    return total, solo


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=ROOT
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8, help="per load window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=200, help="per server at one client")
    parser.add_argument(
        "--client",
        choices=["wrk", "lean", "httpx"],
        default=None,
        help="load generator of the throughput phases (default: wrk where installed, else lean; see the module docstring)",
    )
    parser.add_argument(
        "--runtime",
        choices=["auto", "torch", "onnxruntime", "onnxruntime-int8"],
        default="auto",
        help="what runs the model in the replicas (`surgery serve --runtime`)",
    )
    parser.add_argument("--serve-args", default="", help="extra `surgery serve` options")
    parser.add_argument("--serve-env", default="", help="extra environment for `surgery serve`: K=V,K=V")
    parser.add_argument(
        "--bare-threads", default="1", help="torch threads of the bare app (`default`: torch's, one per core)"
    )
    opts = parser.parse_args()
    opts.client = wrkload.pick_client(opts.client)

    # OMP threads that spin while waiting make a forward sharing its cores with anything else tens
    # of times slower: both servers get what the replicas set for themselves
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("RAY_ADDRESS", None)
    serve_env = dict(kv.split("=", 1) for kv in opts.serve_env.split(",") if kv)
    sys.path.insert(0, str(ROOT))
    workdir = Path(tempfile.mkdtemp(prefix="serve-small-"))
    bundle = export_quickstart(workdir, opts.runtime)
    bare_port, served_port = free_port(), free_port()
    urls = {
        "bare": f"http://127.0.0.1:{bare_port}/predict",
        "served": f"http://127.0.0.1:{served_port}/v1/models/quickstart:predict",
    }
    servers = {
        "bare": start([sys.executable, "-c", BARE_APP, str(bundle), str(bare_port), opts.bare_threads], env),
        "served": start(
            [
                sys.executable,
                "-c",
                "from cli import main; main()",
                "serve",
                str(bundle),
                "--port",
                str(served_port),
                "--runtime",
                opts.runtime,
                *opts.serve_args.split(),
            ],
            {**env, **serve_env},
        ),
    }
    body = IMAGE.read_bytes()
    try:
        for name in servers:
            wait_ready(urls[name], servers[name])
        lean = opts.client != "httpx"  # the one-client phase: lean unless httpx was asked for
        for url in urls.values():
            throughput(opts.client, url, body, 8, 2)  # warm-up
        rps: dict[str, list[float]] = {name: [] for name in urls}
        times: dict[str, list[float]] = {name: [] for name in urls}
        phases: list[dict[str, float]] = []
        for _ in range(opts.rounds):
            for name, url in urls.items():
                rps[name].append(throughput(opts.client, url, body, opts.clients, opts.seconds))
            t, p = (
                loadgen.run(lean_latencies(urls, body, opts.requests // opts.rounds))
                if lean
                else asyncio.run(latencies(urls, body, opts.requests // opts.rounds))
            )
            for name in urls:
                times[name].extend(t[name])
            phases.extend(p)
        batches, solo = replica_stats(urls["served"].replace(":predict", "/stats"))
    finally:
        for proc in servers.values():
            stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)

    cores = os.cpu_count() or 1
    bare_rps, served_rps = statistics.median(rps["bare"]), statistics.median(rps["served"])
    bare_p50, served_p50 = (statistics.median(times[n]) * 1000 for n in ("bare", "served"))
    print(
        f"\nquickstart model, PNG {len(body)} bytes, {cores} cores, {opts.rounds} rounds of {opts.seconds:.0f} s; "
        f"bare app torch threads: {opts.bare_threads}; client: {opts.client}; served runtime: {opts.runtime}"
    )
    print(
        f"  {opts.clients} clients: served {served_rps:7.1f} req/s, bare uvicorn+FastAPI {bare_rps:7.1f} req/s "
        f"-> {served_rps / bare_rps:.2f}x (rounds: served {[round(x) for x in rps['served']]}, bare {[round(x) for x in rps['bare']]})"
    )
    print(
        f"  1 client p50: served {served_p50:.1f} ms, bare {bare_p50:.1f} ms -> {served_p50 - bare_p50:+.1f} ms "
        f"({len(times['served'])} requests each, alternating)"
    )
    rows = sum(int(size) * count for size, count in batches.items())
    ones = batches.get("1", 0)
    print(
        f"  served batches (every replica, whole run): {sum(batches.values())} forwards of {rows} rows, "
        f"mean {rows / max(1, sum(batches.values())):.1f} rows; rows that ran alone: {ones}"
    )
    print(f"  a lone request in each replica: {'; '.join(sorted(solo))}")
    if phases:
        keys = list(phases[0])
        medians = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in keys}
        print(
            "  served at 1 client, inside the replica (Server-Timing medians, ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in medians.items())
        )
        print(f"  so outside the app (HAProxy, HTTP, Ray's request path): {served_p50 - medians['total']:.1f} ms")


if __name__ == "__main__":
    main()

"""Serving throughput and latency against the raw model, in one run.

Clients send JPEG images (224x224) as `image/jpeg` bodies from one load generator on this machine
(`wrk` where installed, through `benchmarks/wrkload.py`: C, a few microseconds per request, and any
answer but 2xx voids the measurement; else, or with `--client lean`, `benchmarks/loadgen.py`:
keep-alive connections, about 0.05 ms of CPU per request; either way the replicas keep the cores) to
`surgery serve`'s application (Ray Serve, dynamic batching, HAProxy ingress unless `--ingress proxy`), for a resnet18-class and a
mobilenet-class model (torchvision, random init):

- served throughput at 32 concurrent clients vs raw in-process `inference_mode` throughput at
  the batch size Serve formed (target for resnet18 >= 0.86x);
- p50 latency at concurrency 1 vs the model's own batch-1 forward time using every core (target
  for resnet18 <= +10 ms), measured alternately, one request then one in-process forward, so a busy or idle
  spell of this shared machine lands on both;
- batching on vs off, next to the raw batch-N / batch-1 speed-up;
- the replicas' ceiling: the runtime they chose, in this process, at the batch size Serve formed
  on one replica's threads, times the replicas (they run at once on separate cores, where a
  forward's CPU time per image stays the same): what serving could reach with no decode, HTTP,
  batching, HAProxy or Ray at all, and how much of it the served figure reaches.

`--runtime` picks what runs the model in the replicas (`serve.runtime`: auto, torch, onnxruntime,
onnxruntime-int8; bundles are exported with `model.onnx`). Throughput is always compared with raw
eager torch; p50 at one client with the raw batch-1 forward of the runtime the replicas run. For
onnxruntime-int8 the bundles are quantized with calibration on synthetic data and the parity gate
opened (`quantize_max_drop: 1`): the weights are random, so only the speed means something here
(`int8_runtime.py` measures the metric on real data).

    python benchmarks/serve_throughput.py [--seconds 12] [--models resnet18,mobilenet_v3_small] [--replicas N] [--ingress haproxy|proxy] [--runtime auto|torch|onnxruntime|onnxruntime-int8] [--client wrk|lean]

Reports; asserts nothing. About 4 minutes on 2 cores (`--models resnet18 --seconds 4`: about 1.5).
The one-client latency phase always uses the lean client (it alternates with in-process forwards).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # benchmarks/loadgen.py
import wrkload  # benchmarks/wrkload.py

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what serve/runtime.py sets in replicas: same for raw

RECIPE = """
name: {name}
backbone: {{source: torchvision, name: {name}, pretrained: false}}
input: {{size: [224, 224]}}
heads:
  - name: cls
    input: logits
    layers: [{{linear: {{out_features: 10}}}}]
    loss: cross_entropy
export: {{formats: [safetensors, onnx]{quantize}}}
{data}"""
INT8 = ", quantize: int8, quantize_max_drop: 1.0, calibration_samples: 32"
SYNTHETIC = "data: {source: synthetic, synthetic: {num_samples: 64, num_classes: 10}, batch_size: 16}\n"
BATCH = 16
WAIT_MS = 2.0
JPEG = {"content-type": "image/jpeg"}


def export(name: str, root: Path, runtime: str) -> Path:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    int8 = runtime == "onnxruntime-int8"
    text = RECIPE.format(name=name, quantize=INT8 if int8 else "", data=SYNTHETIC if int8 else "")
    recipe = load_recipe_text(text)
    return export_bundle(build_model(recipe, load_weights=False), recipe, root / name)


def jpeg_images(n: int = 16) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        base = np.linspace(0, 255, 224, dtype=np.float32)
        pixels = (base[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3)) + rng.normal(0, 12, (224, 224, 3))).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype("uint8")).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def raw_runtime(bundle: Path, runtime: str):
    """The bundle's model on `runtime` in this process (`surgery.runtimes`, as the replicas run it)."""
    from surgery.bundle import load_bundle
    from surgery.runtimes import open_runtime

    return open_runtime(load_bundle(bundle), runtime)


def raw_times(bundle: Path, sizes: list[int], threads: int, runtime: str = "torch") -> dict[int, float]:
    """Seconds per forward at each batch size (median), in-process (torch: inference_mode)."""
    import torch

    model = raw_runtime(bundle, runtime)
    out = {}
    for n in sizes:
        x = (torch.randn(n, 3, 224, 224),)
        for _ in range(2):
            model.run(x, threads)
        times = []
        budget = time.perf_counter() + 4
        while len(times) < 5 or (time.perf_counter() < budget and len(times) < 40):
            start = time.perf_counter()
            model.run(x, threads)
            times.append(time.perf_counter() - start)
        out[n] = statistics.median(times)
    return out


async def interleaved_latency(
    url: str, images: list[bytes], bundle: Path, threads: int, seconds: float, runtime: str
) -> tuple[float, float, float]:
    """(served p50, raw batch-1 p50, the replica's own forward p50 from `Server-Timing`) in seconds
    at concurrency 1, alternating one served request with one in-process forward of the same model
    on the same runtime, so that both see the same machine state."""
    import torch

    model = raw_runtime(bundle, runtime)
    x = (torch.randn(1, 3, 224, 224),)
    model.run(x, threads)
    served: list[float] = []
    raw: list[float] = []
    forward: list[float] = []
    stop = time.perf_counter() + seconds
    async with loadgen.Connection(url) as client:
        requests = [client.request(image, JPEG) for image in images]
        k = 0
        while time.perf_counter() < stop or len(served) < 20:
            start = time.perf_counter()
            model.run(x, threads)
            raw.append(time.perf_counter() - start)
            start = time.perf_counter()
            status, headers, body = await client.send(requests[k % len(requests)])
            served.append(time.perf_counter() - start)
            if status != 200:
                raise loadgen.LoadError(f"HTTP {status}: {body[:200]!r}")
            timing = dict(part.strip().split(";dur=") for part in headers["server-timing"].split(","))
            forward.append(float(timing["forward"]) / 1000)
            k += 1
    return statistics.median(served), statistics.median(raw), statistics.median(forward)


def load(url: str, images: list[bytes], concurrency: int, seconds: float, client: str) -> tuple[float, float]:
    """(requests/s, mean batch size the answers report) with `concurrency` clients posting JPEGs
    for `seconds` on the chosen load generator."""
    if client == "wrk":
        result = wrkload.load(url, images, JPEG, concurrency, seconds, batch_sizes=True)
        if result.mean_batch is None:
            raise SystemExit(f"{url}: no answer reported its batch size")
        return result.rps, result.mean_batch
    batches: list[int] = []
    rps, _ = loadgen.load(
        url, images, JPEG, concurrency, seconds, lambda r: batches.append(json.loads(r[2])["batch_sizes"][0])
    )
    return rps, statistics.mean(batches)


def replica_runtime(stats_url: str) -> tuple[str, str]:
    """The runtime a replica runs and why (every replica of a deployment decides for itself; this
    asks one)."""
    import httpx

    stats = httpx.get(stats_url, timeout=30).json()
    return stats["runtime"], stats["runtime_reason"]


def deploy(
    bundle: Path, max_batch_size: int, wait_ms: float, threads: int, replicas: int, solo_threads: int, runtime: str
) -> None:
    from ray import serve

    from serve.app import build_app

    args = {
        "bundles": [str(bundle)],
        "max_batch_size": max_batch_size,
        "batch_wait_ms": wait_ms,
        "num_cpus": max(0.5, (os.cpu_count() or 1) / replicas),
        "threads": threads,
        "solo_threads": solo_threads,
        "replicas": replicas,
        "runtime": runtime,
    }
    serve.run(build_app(args), name="surgery", route_prefix="/")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--replicas", type=int, default=None, help="model replicas (default: serve.replicas auto, one per core)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per replica (default: cores / replicas)"
    )
    parser.add_argument(
        "--solo-threads", type=int, default=None, help="torch threads for a lone request (default: cores)"
    )
    parser.add_argument(
        "--ingress", choices=["haproxy", "proxy"], default="haproxy", help="HTTP ingress in front of the replicas"
    )
    parser.add_argument("--wait-ms", type=float, default=WAIT_MS, help="batch wait")
    parser.add_argument(
        "--runtime",
        choices=["auto", "torch", "onnxruntime", "onnxruntime-int8"],
        default="auto",
        help="what runs the model in the replicas (serve.runtime)",
    )
    parser.add_argument(
        "--client",
        choices=["wrk", "lean"],
        default=None,
        help="load generator of the throughput phases (default: wrk where installed, else lean)",
    )
    opts = parser.parse_args()
    opts.client = wrkload.pick_client(opts.client)
    cores = os.cpu_count() or 1
    if opts.replicas is None:
        from serve.config import replica_count

        opts.replicas = replica_count("auto")
    threads = opts.threads or max(1, cores // opts.replicas)
    solo = opts.solo_threads or cores
    models = opts.models.split(",")
    images = jpeg_images()
    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    bundles = {name: export(name, root, opts.runtime) for name in models}
    # the raw baseline is the machine's best in-process forward: every core in one process
    raw = {name: raw_times(bundles[name], [1, 2, 4, 8, 16], cores) for name in models}

    import ray
    from ray import serve

    if opts.ingress == "haproxy":
        from serve.ingress import haproxy_environment

        os.environ.update(haproxy_environment(f"bench-{opts.port}"))
    from serve.launch import own_ray_environment

    own_ray_environment()  # the environment `surgery serve` gives the Ray it starts (and its replicas)
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
    base = f"http://127.0.0.1:{opts.port}"
    rows = []
    try:
        for name in models:
            url = f"{base}/v1/models/{name}:predict"
            deploy(bundles[name], BATCH, opts.wait_ms, threads, opts.replicas, solo, opts.runtime)
            load(url, images, 8, 2, opts.client)  # warm-up
            runtime, why = replica_runtime(url.replace(":predict", "/stats"))
            on_rps, mean_batch = load(url, images, 32, opts.seconds, opts.client)
            p50_c1, raw_b1, replica_b1 = loadgen.run(
                interleaved_latency(url, images, bundles[name], cores, min(opts.seconds, 8), runtime)
            )
            deploy(bundles[name], 1, 0.0, threads, opts.replicas, solo, opts.runtime)
            load(url, images, 8, 2, opts.client)
            off_rps, _ = load(url, images, 32, opts.seconds, opts.client)
            n = min(raw[name], key=lambda size: abs(size - mean_batch))
            # what the replicas could do with no serving work at all: each runs its forwards on its
            # own threads at once (on separate cores a forward's CPU time per image stays the same)
            ceiling_s = raw_times(bundles[name], [n], threads, runtime)[n]
            rows.append(
                {
                    "model": name,
                    "runtime": runtime,
                    "why": why,
                    "mean_batch": mean_batch,
                    "raw_n": n,
                    "raw_rps_n": n / raw[name][n],
                    "raw_rps_1": 1 / raw[name][1],
                    "raw_rps_16": 16 / raw[name][16],
                    "on_rps": on_rps,
                    "off_rps": off_rps,
                    "p50_c1_ms": p50_c1 * 1000,
                    "raw_b1_ms": raw_b1 * 1000,
                    "raw_b1_alone_ms": raw[name][1] * 1000,
                    "replica_b1_ms": replica_b1 * 1000,
                    "ceiling_rps": opts.replicas * n / ceiling_s,
                }
            )
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"\n{opts.ingress} ingress, {opts.replicas} replica(s) x {threads} torch threads ({solo} for a lone request; raw: {cores}), JPEG 224x224, batching max {BATCH} / wait {opts.wait_ms} ms, {opts.seconds:.0f} s per run, client {opts.client}"
    )
    for r in rows:
        print(f"\n{r['model']} on {r['runtime']} ({r['why']})")
        print(
            f"  served, 32 clients, batching on : {r['on_rps']:7.1f} img/s (mean batch {r['mean_batch']:.1f}); "
            f"raw torch batch {r['raw_n']}: {r['raw_rps_n']:7.1f} img/s -> {r['on_rps'] / r['raw_rps_n']:.2f}x raw"
        )
        print(
            f"  ceiling: raw {r['runtime']} batch {r['raw_n']} on {threads} thread(s) x {opts.replicas} replica(s) at once, "
            f"no serving work: {r['ceiling_rps']:7.1f} img/s = {r['ceiling_rps'] / r['raw_rps_n']:.2f}x raw torch; "
            f"served reaches {r['on_rps'] / r['ceiling_rps']:.0%} of it (the rest: decode, HTTP, batching, HAProxy, Ray)"
        )
        print(
            f"  served, 32 clients, batching off: {r['off_rps']:7.1f} img/s -> on/off {r['on_rps'] / r['off_rps']:.2f}x "
            f"(raw batch-16/batch-1 speed-up {r['raw_rps_16'] / r['raw_rps_1']:.2f}x, "
            f"batch-{r['raw_n']}/batch-1 {r['raw_rps_n'] / r['raw_rps_1']:.2f}x)"
        )
        print(
            f"  p50 latency, 1 client: {r['p50_c1_ms']:.1f} ms vs raw {r['runtime']} batch-1 forward {r['raw_b1_ms']:.1f} ms "
            f"(+{r['p50_c1_ms'] - r['raw_b1_ms']:.1f} ms)"
        )
        print(
            f"    the replica's own forward {r['replica_b1_ms']:.1f} ms (so {r['p50_c1_ms'] - r['replica_b1_ms']:.1f} ms "
            f"outside the model); raw torch batch-1 back to back, measured first: {r['raw_b1_alone_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()

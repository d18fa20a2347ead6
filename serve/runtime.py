"""The model runtime: one bundle in one replica. Decode → batch → forward → outputs per head.

Protocol adapters (`/v1` in `serve.responses`, the Open Inference Protocol in `serve.v2`) turn a
request into inputs and outputs into a response; this module owns what happens in between:
decoding off the event loop (stopped when the request is cancelled), forming batches while the
model is busy, and running forwards on one model thread with the right number of cores.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Replicas share cores with the HTTP proxy and with each other: OpenMP threads that spin while
# waiting make an oversubscribed forward tens of times slower. Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from ray import serve

from serve import responses, v2
from serve.config import BATCH_DEFAULTS
from serve.cores import CoreClaim
from serve.decode import InputError, RowPreparer, Stopped, v1_items
from surgery.runtimes import fastest_ms, timed

logger = logging.getLogger("ray.serve")

INLINE_DECODE_BYTES = 256 * 1024  # a lone request this small is decoded on the event loop
SOLO_TIMING_BUDGET_S = 0.1  # a forward slower than this on the replica's share gains from more threads: not timed
SOLO_TIMING_WAIT_S = 10.0  # how long a starting replica waits for another one's timing before its own
RowResult = tuple[dict[str, np.ndarray], int, float, float]  # outputs by head, batch size, start, end


class Answer:
    """What a protocol adapter hands back: status, body, content type, extra headers, timings."""

    __slots__ = ("body", "headers", "media_type", "status", "timings")

    def __init__(
        self,
        status: int,
        body: bytes,
        media_type: str = "application/json",
        headers: dict[str, str] | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.status, self.body, self.media_type = status, body, media_type
        self.headers = headers or {}
        self.timings = timings or {}


def json_answer(status: int, payload: Any, timings: dict[str, float] | None = None) -> Answer:
    import json

    return Answer(status, json.dumps(payload, separators=(",", ":")).encode(), timings=timings)


class ModelServer:
    """One bundle in one replica: decodes and validates requests, batches them, predicts."""

    def __init__(self, bundle: str, settings: dict[str, Any]) -> None:
        import torch

        from surgery.bundle import load_bundle
        from surgery.runtimes import TORCH, choose_runtime, example_batch

        share = int(settings["threads"])
        torch.set_num_threads(share)
        requested = str(settings.get("runtime") or "auto")
        # an exported graph alone needs no PyTorch model: neither its build time nor its weights
        loaded = load_bundle(Path(bundle), torch_model=requested in ("auto", TORCH))
        # warmed up (the first forward pays allocations, not the first user); `auto` times every
        # runtime the bundle allows on this replica's share of cores and keeps the fastest
        self.runtime, self.runtime_choice = choose_runtime(loaded, requested, threads=share)
        self._example = example_batch(loaded)
        self.spec = loaded.input_spec
        self.tokenizer = loaded.tokenizer
        self.manifest = loaded.manifest
        del loaded  # a runtime other than torch lets the PyTorch model go
        self.name: str = self.manifest["name"]
        self.heads: list[dict[str, Any]] = list(self.manifest["heads"])
        # Batch settings arrive through `reconfigure` (the deployment's user_config), so changing
        # them never changes init args, and Ray updates running replicas instead of replacing them.
        self.settings = {**BATCH_DEFAULTS, **settings}
        self.batch_sizes: Counter[int] = Counter()
        self.cancelled = 0  # requests given up while being answered (client gone)
        self.rows_decoded = 0
        self.threads_used: Counter[int] = Counter()  # forwards run with each thread count
        transform = None
        if self.spec.kind == "image":
            from surgery.preprocess import image_eval_transform

            transform = image_eval_transform(self.spec)
        self._prepare = RowPreparer(self.spec, transform, self._count_row)
        self._cores = CoreClaim()
        # One thread runs the model so the event loop keeps decoding and queueing the next batch.
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{self.name}")
        # `serve.batch` forms the next batch as soon as the previous one is handed off, not when
        # the model is free: under load that makes many batches of one or two queue up behind a
        # running forward. Rows therefore enter the batch queue only while the model is idle; rows
        # arriving during a forward wait here and form the next batch together.
        self._idle = asyncio.Event()
        self._idle.set()
        self._preparing = 0  # requests being decoded: the batch may still grow with them
        self._gated = 0  # requests decoded and waiting for the model to be idle
        self._running = 0  # forwards handed to the model thread and not returned
        self._waiting = 0  # rows queued for a batch or running, not answered yet

        async def surgery_predict_batch(rows: list[Any]) -> list[RowResult]:
            return await self._run(rows, solo=False)

        self._batched = serve.batch(
            max_batch_size=int(self.settings["max_batch_size"]),
            batch_wait_timeout_s=float(self.settings["batch_wait_timeout_s"]),
        )(surgery_predict_batch)
        self.solo_threads = max(share, int(self.settings["solo_threads"]))  # what a lone request gets
        self.solo_timing_ms: dict[str, float] = {}  # the lone forward's time on each thread count
        if self.settings.get("time_solo_threads", True) and self.solo_threads > share:
            with self._cores.whole_machine(wait_s=SOLO_TIMING_WAIT_S):  # replicas starting together take turns
                self.solo_threads, self.solo_timing_ms = faster_threads(self._timed_forward, share, self.solo_threads)
            torch.set_num_threads(share)
            logger.info(
                "model %s: a lone request runs on %d threads (%s)", self.name, self.solo_threads, self.solo_timing_ms
            )
        if self.solo_threads > share and str(self.solo_threads) not in self.solo_timing_ms:
            # an ONNX Runtime session's threads are fixed when it is made: make the lone request's
            # now, not on the first lone request
            self._timed_forward(self.solo_threads)
            torch.set_num_threads(share)
        logger.info("model %s runs on %s: %s", self.name, self.runtime.name, self.runtime_choice.reason)

    def _timed_forward(self, threads: int) -> float:
        """Seconds of one forward of one example on `threads` threads."""
        return timed(self.runtime, self._example, threads)()

    def _count_row(self) -> None:
        self.rows_decoded += 1

    def reconfigure(self, config: dict[str, Any]) -> None:
        if "max_batch_size" in config:
            self.settings["max_batch_size"] = int(config["max_batch_size"])
            self._batched.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self.settings["batch_wait_timeout_s"] = float(config["batch_wait_timeout_s"])
            self._batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    # ------------------------------------------------------------------ metadata

    def info(self) -> dict[str, Any]:
        """The manifest summary `GET /v1/models/{name}` returns."""
        m = self.manifest
        return {
            "name": self.name,
            "input": m.get("input"),
            "input_names": m.get("input_names"),
            "heads": self.heads,
            "formats": sorted((m.get("formats") or {}).keys()),
            "quantized": {
                kind: {key: q.get(key) for key in ("file", "method", "passed", "reason", "heads")}
                for kind, q in (m.get("quantized") or {}).items()
            },
            "runtime": self.runtime_choice.to_dict(),
            "metrics": m.get("metrics") or {},
            "recipe_sha256": m.get("recipe_sha256"),
            "created": m.get("created"),
            "batching": {k: self.settings[k] for k in ("max_batch_size", "batch_wait_timeout_s")},
            "max_body_mb": self.settings["max_body_mb"],
        }

    def metadata_v2(self) -> dict[str, Any]:
        """The Open Inference Protocol model metadata."""
        return v2.model_metadata(self.name, self.spec, self.heads)

    def stats(self) -> dict[str, Any]:
        return {
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "threads": {str(k): v for k, v in sorted(self.threads_used.items())},
            "solo_threads": self.solo_threads,
            "solo_timing_ms": self.solo_timing_ms,
            "runtime": self.runtime.name,
            "runtime_reason": self.runtime_choice.reason,
            "runtime_timing_ms": self.runtime_choice.timing_ms,
            "max_batch_size": self.settings["max_batch_size"],
            "batch_wait_timeout_s": self.settings["batch_wait_timeout_s"],
            "queue_depth": self._preparing + self._gated + self._waiting,
            "cancelled": self.cancelled,
            "rows_decoded": self.rows_decoded,
        }

    # ------------------------------------------------------------------ protocols

    async def predict(self, content_type: str, body: bytes) -> Answer:
        """Answer one `/v1` predict request. Never raises (but may be cancelled)."""

        async def answer(timings: dict[str, float], inline: bool) -> Answer:
            items = await v1_items(content_type, body, inline)
            outputs, sizes = await self._infer(items, timings, inline)
            payload = responses.v1_predictions(self.name, self.heads, outputs, sizes, self.settings["top_k"])
            return json_answer(200, payload)

        return await self._answered(answer, len(body), v1_error)

    async def infer_v2(self, body: bytes, header_length: int | None) -> Answer:
        """Answer one Open Inference Protocol `infer` request. Never raises (but may be cancelled)."""

        async def answer(timings: dict[str, float], inline: bool) -> Answer:
            request = (
                v2.parse_request(body, header_length)
                if inline
                else await asyncio.to_thread(v2.parse_request, body, header_length)
            )
            items = v2.model_items(request, self.spec)
            v2.check_outputs(request, self.heads)
            outputs, _ = await self._infer(items, timings, inline)
            data, headers = v2.encode_response(self.name, request, self.heads, outputs)
            media = "application/octet-stream" if v2.HEADER_LENGTH in headers else "application/json"
            return Answer(200, data, media, headers)

        return await self._answered(answer, len(body), v2.error_answer_body)

    async def _answered(self, answer: Any, size: int, error_body: Any) -> Answer:
        timings: dict[str, float] = {"start": time.perf_counter()}
        timeout = float(self.settings["request_timeout_s"])
        # a lone small request is decoded right here: a thread hop would only add latency
        inline = self._alone() and size <= INLINE_DECODE_BYTES
        try:
            result = await asyncio.wait_for(answer(timings, inline), timeout)
        except asyncio.CancelledError:  # the client is gone: its decoding stops, its rows leave the queue
            self.cancelled += 1
            raise
        except InputError as exc:
            result = Answer(exc.status, error_body(str(exc)))
        except TimeoutError:
            result = Answer(504, error_body(f"prediction took longer than {timeout:g} s"))
        except Exception:
            logger.exception("predict failed for model %s", self.name)
            result = Answer(500, error_body("internal error while predicting (see the server log)"))
        timings.pop("start", None)
        if "forward_end" in timings:
            timings["respond"] = (time.perf_counter() - timings.pop("forward_end")) * 1000
        result.timings = timings
        return result

    # ------------------------------------------------------------------ decode, batch, forward

    async def _infer(
        self, items: list[Any], timings: dict[str, float], inline: bool
    ) -> tuple[dict[str, np.ndarray], list[int]]:
        """Rows for `items`, run through the model (batched with other requests' rows): the
        outputs by head (N × …) and the batch size each row ran in."""
        rows = await self._rows(items, inline)
        decoded = time.perf_counter()
        timings["decode"] = (decoded - timings.pop("start")) * 1000
        results = await self._enqueue(rows)
        began = min(r[2] for r in results)
        ended = max(r[3] for r in results)
        timings["queue"] = (began - decoded) * 1000
        timings["forward"] = (ended - began) * 1000
        timings["forward_end"] = ended
        outputs = {h["name"]: np.stack([r[0][h["name"]] for r in results]) for h in self.heads}
        return outputs, [r[1] for r in results]

    async def _rows(self, items: list[Any], inline: bool) -> list[Any]:
        self._preparing += 1
        stop = threading.Event()
        try:
            if inline and len(items) == 1:
                return self._prepare(items)
            # a cancelled request (client gone, time up) stops its decoding at the next input
            return await asyncio.to_thread(self._prepare, items, stop)
        except (asyncio.CancelledError, Stopped):
            stop.set()
            raise asyncio.CancelledError from None
        finally:
            self._preparing -= 1

    def _alone(self) -> bool:
        """Nothing else in this replica: no request decoding, waiting or running."""
        return self._preparing == 0 and self._gated == 0 and self._waiting == 0 and self._idle.is_set()

    async def _enqueue(self, rows: list[Any]) -> list[RowResult]:
        """Queue rows for the next batch once the model is idle. A lone request has nobody to wait
        for: it runs at once, as one batch, with the solo thread count."""
        self._gated += 1
        try:
            await self._idle.wait()
        finally:
            self._gated -= 1
        solo = self._alone() and len(rows) <= int(self.settings["max_batch_size"])
        self._waiting += len(rows)
        try:
            if solo:
                return await self._run(rows, solo=True)
            return await asyncio.gather(*(self._batched(row) for row in rows))
        finally:
            self._waiting -= len(rows)

    async def _run(self, rows: list[Any], solo: bool) -> list[RowResult]:
        """One forward on the model thread; the model counts as busy until every forward handed to
        it has returned."""
        self._running += 1
        self._idle.clear()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._forward_pool, self._forward, rows, solo)
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    def _forward(self, rows: list[Any], solo: bool) -> list[RowResult]:
        """Run one batch. A solo batch (the replica's only request) uses `solo_threads` when no
        other replica is busy."""
        began = time.perf_counter()
        share, whole = int(self.settings["threads"]), self.solo_threads
        with self._cores.claim(solo and whole > share) as alone:
            threads = whole if alone else share
            self.threads_used[threads] += 1
            return self._run_model(rows, began, threads)

    def _run_model(self, rows: list[Any], began: float, threads: int) -> list[RowResult]:
        import torch

        n = len(rows)
        self.batch_sizes[n] += 1
        if self.spec.kind == "text":  # tokenisation stays in Python, whatever runs the network
            from surgery.preprocess import texts_to_batch

            inputs: tuple[Any, ...] = texts_to_batch(rows, self.tokenizer, self.spec)
        else:
            inputs = (torch.stack(rows),)
        arrays = self.runtime.run(inputs, threads)
        ended = time.perf_counter()
        return [({name: array[i] for name, array in arrays.items()}, n, began, ended) for i in range(n)]


def faster_threads(
    forward: Callable[[int], float], share: int, whole: int, repeats: int = 7
) -> tuple[int, dict[str, float]]:
    """The torch threads a lone forward should use: `whole`, unless a forward on `whole` threads
    is at least 10% slower than on `share` (a small model: waking and joining threads costs more
    than its work); and the fastest milliseconds of each. `forward(n)` runs one forward on n
    threads and returns its seconds. The fastest of several alternating runs is compared, since
    other work on the machine (another replica starting) only ever adds time, and it adds more to
    the run that needs every core: a close call keeps every core. A forward slower than
    SOLO_TIMING_BUDGET_S is not timed: more threads pay for a model that size, and timing it
    would slow the replica's start."""
    first = forward(share)
    if first > SOLO_TIMING_BUDGET_S:
        return whole, {str(share): round(first * 1000, 3)}
    forward(whole)  # the wider thread pool's first use
    ms = fastest_ms({n: functools.partial(forward, n) for n in (share, whole)}, repeats)
    return (share if ms[whole] > 1.1 * ms[share] else whole), {str(n): round(v, 3) for n, v in ms.items()}


def v1_error(message: str) -> bytes:
    import json

    return json.dumps({"error": message}).encode()

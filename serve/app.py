"""The Ray Serve application: HTTP in front of exported bundles, with dynamic batching.

One application serves every bundle given to it. With a single bundle the FastAPI ingress *is*
the model deployment (no handle hop between proxy and model, which is what keeps batch-1
latency and throughput close to the raw model on a small machine). With several bundles a thin
ingress routes each request, as raw bytes, to one model deployment per bundle so each model
scales on its own. Either way the same `ModelServer` decodes, validates, batches and predicts.

Nothing here imports training code: a bundle (`surgery.bundle.load_bundle`) and the shared
preprocessing (`surgery.preprocess`) are all a replica reads.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Replicas share cores with the HTTP proxy and with each other: OpenMP threads that spin while
# waiting make an oversubscribed forward tens of times slower. Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.tokens import TOKEN_ENV, read_token
from surgery.bundle import read_manifest
from surgery.errors import BundleError
from surgery.schema import Serve as ServeSection

logger = logging.getLogger("ray.serve")

INGRESS_NAME = "SurgeryAPI"
MAX_INPUTS_PER_REQUEST = 256
INLINE_DECODE_BYTES = 256 * 1024  # a lone request this small is decoded on the event loop
MAX_IMAGE_PIXELS = 40_000_000  # a decompression bomb is refused before it is decoded
BATCH_KEYS = ("max_batch_size", "batch_wait_timeout_s")
BATCH_DEFAULTS = {
    "max_batch_size": ServeSection().max_batch_size,
    "batch_wait_timeout_s": ServeSection().batch_wait_ms / 1000,
}


class InputError(Exception):
    """A request the client must fix; `status` is the HTTP status it gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- app arguments


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")

    bundles: list[str] = Field(min_length=1, description="Bundle folders to serve (one model each).")
    max_batch_size: int | None = Field(None, ge=1, description="Overrides the recipes' serve.max_batch_size.")
    batch_wait_ms: float | None = Field(None, ge=0, description="Overrides the recipes' serve.batch_wait_ms.")
    replicas: int | None = Field(None, ge=1, description="Overrides the recipes' serve.replicas.")
    max_body_mb: float | None = Field(None, gt=0, description="Overrides the recipes' serve.max_body_mb.")
    request_timeout_s: float | None = Field(None, gt=0, description="Overrides the recipes' serve.request_timeout_s.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each model replica.")
    threads: int | None = Field(
        None, ge=1, description="torch threads per model replica (default: num_cpus, at least 1)."
    )
    solo_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads for a request the replica has to itself, with no other replica on the node "
        "busy (default: threads). `surgery serve` on one machine sets it to the core count, so a lone request "
        "uses every core while load is still spread one replica per core.",
    )
    token_file: str | None = Field(
        None, description=f"File holding the bearer token (else ${TOKEN_ENV} in the replica)."
    )
    token_sha256: str | None = Field(None, description="sha256 hex of the bearer token (what `surgery serve` passes).")


def read_serve_section(bundle: str | Path) -> ServeSection:
    """The `serve:` section of the bundle's resolved recipe (schema defaults when absent)."""
    path = Path(bundle) / "recipe.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        data = {}
    section = data.get("serve") if isinstance(data, dict) else None
    try:
        return ServeSection.model_validate(section or {})
    except ValueError as exc:
        raise BundleError(f"{path}: invalid serve section ({exc})") from None


def model_settings(args: AppArgs, section: ServeSection) -> dict[str, Any]:
    """Per-model settings: command-line/config overrides win over the recipe's serve section."""
    threads = args.threads or max(1, int(args.num_cpus))
    return {
        "max_batch_size": args.max_batch_size or section.max_batch_size,
        "batch_wait_timeout_s": (args.batch_wait_ms if args.batch_wait_ms is not None else section.batch_wait_ms)
        / 1000,
        "max_body_mb": args.max_body_mb or section.max_body_mb,
        "request_timeout_s": args.request_timeout_s or section.request_timeout_s,
        "top_k": section.top_k,
        "threads": threads,
        "solo_threads": max(threads, args.solo_threads or threads),
    }


def replica_count(setting: str | int) -> int:
    """`serve.replicas` as a number: `auto` is one replica per CPU core, at most 4."""
    return min(4, os.cpu_count() or 1) if setting == "auto" else int(setting)


def deployment_options(args: AppArgs, section: ServeSection, settings: dict[str, Any]) -> dict[str, Any]:
    """Ray Serve deployment options for one model (replicas, autoscaling, batch user_config)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": max(section.max_ongoing_requests, 2 * settings["max_batch_size"]),
        "user_config": {
            "max_batch_size": settings["max_batch_size"],
            "batch_wait_timeout_s": settings["batch_wait_timeout_s"],
        },
        "ray_actor_options": {"num_cpus": args.num_cpus},
    }
    if args.replicas is None and section.autoscaling is not None:
        auto = section.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": auto.min_replicas,
            "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = args.replicas or replica_count(section.replicas)
    return options


# --------------------------------------------------------------------------- input decoding


def _decode_image(data: bytes, index: int) -> Any:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(f"inputs[{index}]: image of {width}x{height} pixels is too large", 413)
        image.load()
    except InputError:
        raise
    except Exception:
        raise InputError(f"inputs[{index}]: not a decodable image (send PNG/JPEG bytes, base64 in JSON)") from None
    return image


def _b64_bytes(text: str, index: int) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"inputs[{index}]: expected a base64-encoded image, got invalid base64") from None


def _number_array(item: Any, shape: tuple[int, ...], what: str, index: int) -> np.ndarray:
    if not isinstance(item, list):
        raise InputError(f"inputs[{index}]: expected {what} as a nested list of numbers, got {type(item).__name__}")
    try:
        array = np.asarray(item)
    except ValueError:
        raise InputError(f"inputs[{index}]: nested list is ragged; expected shape {list(shape)}") from None
    if array.dtype.kind not in "fiu":
        raise InputError(f"inputs[{index}]: expected numbers, got values of type {array.dtype.name}")
    if array.shape != shape:
        if len(shape) == 3 and array.ndim == 3 and array.shape[1:] == shape[1:]:
            raise InputError(f"inputs[{index}]: expected {shape[0]} channels, got {array.shape[0]}")
        raise InputError(f"inputs[{index}]: expected shape {list(shape)}, got {list(array.shape)}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"inputs[{index}]: contains NaN or infinity")
    return array


async def _multipart_items(content_type: str, body: bytes) -> list[Any]:
    async def stream():
        yield body

    parser = MultiPartParser(
        Headers({"content-type": content_type}), stream(), max_files=MAX_INPUTS_PER_REQUEST, max_part_size=len(body) + 1
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InputError(f"malformed multipart body: {exc.message}") from None
    items: list[Any] = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            items.append(await value.read())
        else:
            items.append(value)
    return items


def _json_items(body: bytes) -> list[Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InputError('malformed JSON body; expected {"inputs": [...]}') from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InputError('expected a JSON object {"inputs": [...]}')
    items = payload["inputs"]
    if not isinstance(items, list):
        raise InputError('"inputs" must be a list (one entry per example)')
    return items


# --------------------------------------------------------------------------- outputs


def _head_rows(head: dict[str, Any], values: Any, top_k: int) -> list[dict[str, Any]]:
    """Per-row output of one head: raw values, plus top-k labels for classification heads."""
    import torch

    values = values.float().reshape(values.shape[0], -1)
    task = head.get("task")
    raw = values.tolist()
    if task not in ("multiclass", "binary"):
        return [{"output": row} for row in raw]
    labels = list(head.get("labels") or [])
    if task == "multiclass":
        probs = torch.softmax(values, dim=1)
        names = labels if len(labels) == values.shape[1] else [str(i) for i in range(values.shape[1])]
    elif values.shape[1] == 1:  # one logit: P(positive) and its complement
        p = torch.sigmoid(values)
        probs = torch.cat([1 - p, p], dim=1)
        names = labels if len(labels) == 2 else ["0", "1"]
    else:  # independent labels
        probs = torch.sigmoid(values)
        names = labels if len(labels) == values.shape[1] else [str(i) for i in range(values.shape[1])]
    k = min(top_k, probs.shape[1])
    top = torch.topk(probs, k, dim=1)
    rows = []
    for row, p_row, i_row in zip(raw, top.values.tolist(), top.indices.tolist(), strict=True):
        ranked = [{"label": names[i], "probability": p} for p, i in zip(p_row, i_row, strict=True)]
        rows.append({"output": row, "top_k": ranked})
    return rows


# --------------------------------------------------------------------------- the model


class CoreClaim:
    """Replicas on one machine share its cores. A forward may use more torch threads than its
    replica's share only while no other replica on the machine is running one, or the two would
    fight over the same cores. Every forward takes a shared `flock` on one per-user file; a forward
    that wants the whole machine takes it exclusively, without waiting, or makes do with its share."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or Path(tempfile.gettempdir()) / f"surgery-cores-{os.getuid()}.lock"
        try:
            import fcntl

            self._flock = fcntl.flock
            self._modes = (fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_SH | fcntl.LOCK_NB, fcntl.LOCK_UN)
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except (ImportError, OSError):  # no flock here: never take more than the replica's share
            self._fd = None

    @contextmanager
    def claim(self, whole: bool) -> Iterator[bool]:
        """Hold the claim for one forward; yields True when this forward has the machine alone."""
        if self._fd is None:
            yield False
            return
        exclusive, shared, unlock = self._modes
        held = alone = False
        for mode, gives_whole in ((exclusive, True), (shared, False)) if whole else ((shared, False),):
            try:
                self._flock(self._fd, mode)
            except OSError:  # held the other way by another replica: carry on without it
                continue
            held, alone = True, gives_whole
            break
        try:
            yield alone
        finally:
            if held:
                self._flock(self._fd, unlock)


class ModelServer:
    """One bundle in one replica: decodes and validates requests, batches them, predicts."""

    def __init__(self, bundle: str, settings: dict[str, Any]) -> None:
        import torch

        from surgery.bundle import load_bundle

        torch.set_num_threads(int(settings["threads"]))
        loaded = load_bundle(Path(bundle))
        self.model = loaded.model.eval()
        self.spec = loaded.input_spec
        self.tokenizer = loaded.tokenizer
        self.manifest = loaded.manifest
        self.name: str = self.manifest["name"]
        self.heads: list[dict[str, Any]] = list(self.manifest["heads"])
        # Batch settings arrive through `reconfigure` (the deployment's user_config), so changing
        # them never changes init args, and Ray updates running replicas instead of replacing them.
        self.settings = {**BATCH_DEFAULTS, **settings}
        self.batch_sizes: Counter[int] = Counter()
        self.threads_used: Counter[int] = Counter()  # forwards run with each torch thread count
        self._transform = None
        if self.spec.kind == "image":
            from surgery.preprocess import image_eval_transform

            self._transform = image_eval_transform(self.spec)
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

        async def surgery_predict_batch(rows: list[Any]) -> list[tuple[dict[str, Any], int, float, float]]:
            return await self._run(rows, solo=False)

        self._batched = serve.batch(
            max_batch_size=int(self.settings["max_batch_size"]),
            batch_wait_timeout_s=float(self.settings["batch_wait_timeout_s"]),
        )(surgery_predict_batch)
        with torch.inference_mode():  # the first forward pays allocations; not the first user
            self.model(*self.model.example_inputs(1))

    def reconfigure(self, config: dict[str, Any]) -> None:
        if "max_batch_size" in config:
            self.settings["max_batch_size"] = int(config["max_batch_size"])
            self._batched.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self.settings["batch_wait_timeout_s"] = float(config["batch_wait_timeout_s"])
            self._batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    def info(self) -> dict[str, Any]:
        """The manifest summary `GET /v1/models/{name}` returns."""
        m = self.manifest
        return {
            "name": self.name,
            "input": m.get("input"),
            "input_names": m.get("input_names"),
            "heads": self.heads,
            "formats": sorted((m.get("formats") or {}).keys()),
            "metrics": m.get("metrics") or {},
            "recipe_sha256": m.get("recipe_sha256"),
            "created": m.get("created"),
            "batching": {k: self.settings[k] for k in ("max_batch_size", "batch_wait_timeout_s")},
            "max_body_mb": self.settings["max_body_mb"],
        }

    def stats(self) -> dict[str, Any]:
        return {
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "threads": {str(k): v for k, v in sorted(self.threads_used.items())},
            "max_batch_size": self.settings["max_batch_size"],
            "batch_wait_timeout_s": self.settings["batch_wait_timeout_s"],
        }

    async def predict(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any], dict[str, float]]:
        """Answer one predict request: (HTTP status, JSON payload, timings in ms). Never raises.

        The timings (decode, queue, forward, respond) become the response's `Server-Timing`."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            # a lone small request is decoded right here: a thread hop would only add latency
            inline = self._alone() and len(body) <= INLINE_DECODE_BYTES
            self._preparing += 1
            try:
                rows = await self._rows(content_type, body, inline)
            finally:
                self._preparing -= 1
            decoded = time.perf_counter()
            timings["decode"] = (decoded - start) * 1000
            results = await asyncio.wait_for(self._enqueue(rows), self.settings["request_timeout_s"])
        except InputError as exc:
            return exc.status, {"error": str(exc)}, timings
        except TimeoutError:
            return 504, {"error": f"prediction took longer than {self.settings['request_timeout_s']} s"}, timings
        except Exception:
            logger.exception("predict failed for model %s", self.name)
            return 500, {"error": "internal error while predicting (see the server log)"}, timings
        began = min(r[2] for r in results)
        ended = max(r[3] for r in results)
        timings["queue"] = (began - decoded) * 1000
        timings["forward"] = (ended - began) * 1000
        timings["respond"] = (time.perf_counter() - ended) * 1000
        return (
            200,
            {"model": self.name, "predictions": [r[0] for r in results], "batch_sizes": [r[1] for r in results]},
            timings,
        )

    def _alone(self) -> bool:
        """Nothing else in this replica: no request decoding, waiting or running."""
        return self._preparing == 0 and self._gated == 0 and self._waiting == 0 and self._idle.is_set()

    async def _enqueue(self, rows: list[Any]) -> list[tuple[dict[str, Any], int, float, float]]:
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

    async def _run(self, rows: list[Any], solo: bool) -> list[tuple[dict[str, Any], int, float, float]]:
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

    async def _rows(self, content_type: str, body: bytes, inline: bool = False) -> list[Any]:
        media = content_type.split(";", 1)[0].strip().lower()
        if media == "multipart/form-data":
            items = await _multipart_items(content_type, body)
        elif media.startswith("image/") or media == "application/octet-stream":
            items = [body]  # one encoded image as the whole body
        elif media in ("application/json", "") or media.endswith("+json"):
            items = _json_items(body) if inline else await asyncio.to_thread(_json_items, body)
        else:
            raise InputError(
                f"unsupported content type {media!r}; send application/json, multipart/form-data or image/*", 415
            )
        if not items:
            raise InputError("no inputs given")
        if len(items) > MAX_INPUTS_PER_REQUEST:
            raise InputError(f"{len(items)} inputs in one request; at most {MAX_INPUTS_PER_REQUEST}", 413)
        if inline and len(items) == 1:
            return self._prepare(items)
        return await asyncio.to_thread(self._prepare, items)

    def _prepare(self, items: list[Any]) -> list[Any]:
        """Validate and preprocess each input; runs off the event loop."""
        import torch

        spec = self.spec
        rows: list[Any] = []
        for i, item in enumerate(items):
            if spec.kind == "text":
                if isinstance(item, bytes):
                    item = item.decode("utf-8", errors="replace")
                if not isinstance(item, str):
                    raise InputError(f"inputs[{i}]: expected text, got {type(item).__name__}")
                if not item.strip():
                    raise InputError(f"inputs[{i}]: empty text")
                rows.append(item)
            elif spec.kind == "vector":
                rows.append(torch.from_numpy(_number_array(item, (spec.features,), "a feature vector", i)))
            elif isinstance(item, list):
                shape = (spec.channels, *spec.size)
                rows.append(torch.from_numpy(_number_array(item, shape, "pixel values [C,H,W]", i)))
            elif isinstance(item, str | bytes):
                data = item if isinstance(item, bytes) else _b64_bytes(item, i)
                rows.append(self._transform(_decode_image(data, i)))
            else:
                raise InputError(f"inputs[{i}]: expected an encoded image or pixel values, got {type(item).__name__}")
        return rows

    def _forward(self, rows: list[Any], solo: bool) -> list[tuple[dict[str, Any], int, float, float]]:
        """Run one batch: per row (outputs by head, batch size, start, end). A solo batch (the
        replica's only request) uses `solo_threads` when no other replica is busy."""
        import torch

        began = time.perf_counter()
        share, whole = int(self.settings["threads"]), int(self.settings["solo_threads"])
        with self._cores.claim(solo and whole > share) as alone:
            threads = whole if alone else share
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            self.threads_used[threads] += 1
            return self._run_model(rows, began)

    def _run_model(self, rows: list[Any], began: float) -> list[tuple[dict[str, Any], int, float, float]]:
        import torch

        n = len(rows)
        self.batch_sizes[n] += 1
        with torch.inference_mode():
            if self.spec.kind == "text":
                from surgery.preprocess import texts_to_batch

                inputs = texts_to_batch(rows, self.tokenizer, self.spec)
            else:
                inputs = (torch.stack(rows),)
            outputs = self.model(*inputs)
            per_head = {h["name"]: _head_rows(h, outputs[h["name"]], self.settings["top_k"]) for h in self.heads}
        ended = time.perf_counter()
        return [({name: per_head[name][i] for name in per_head}, n, began, ended) for i in range(n)]


@serve.deployment(name="model")
class ModelDeployment:
    """A model behind the multi-model ingress (one deployment per bundle)."""

    def __init__(self, bundle: str, settings: dict[str, Any]) -> None:
        self.server = ModelServer(bundle, settings)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.server.reconfigure(config)

    async def predict(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any], dict[str, float]]:
        return await self.server.predict(content_type, body)

    def info(self) -> dict[str, Any]:
        return self.server.info()

    def stats(self) -> dict[str, Any]:
        return self.server.stats()


# --------------------------------------------------------------------------- HTTP


api = FastAPI(
    title="surgery",
    description="Predictions from exported surgery bundles.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:3])
    return JSONResponse({"error": f"invalid request ({where})"}, status_code=400)


@api.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": "internal error (see the server log)"}, status_code=500)


_PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "inputs": {
                            "type": "array",
                            "description": "One entry per example: base64 image (image models), "
                            "text (text models), or nested lists of numbers (pixel values [C,H,W] or a feature vector).",
                            "items": {},
                        }
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
        },
    }
}


def _token_digest(settings: dict[str, Any]) -> bytes | None:
    if settings.get("token_sha256"):
        return bytes.fromhex(settings["token_sha256"])
    token = read_token(settings.get("token_file"))
    return hashlib.sha256(token.encode()).digest() if token else None


async def _read_body(request: Request, limit_mb: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit."""
    limit = int(limit_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError("invalid Content-Length header")
        if int(declared) > limit:
            raise InputError(f"request body of {int(declared)} bytes exceeds the {limit_mb:g} MB limit", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"request body exceeds the {limit_mb:g} MB limit", 413)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name=INGRESS_NAME)
@serve.ingress(api)
class SurgeryAPI:
    """HTTP routes. `models` maps a name to a bundle to load here ({"bundle", "settings"}) or to
    the handle of that model's own deployment."""

    def __init__(self, models: dict[str, Any], settings: dict[str, Any]) -> None:
        self.local: dict[str, ModelServer] = {}
        self.remote: dict[str, DeploymentHandle] = {}
        for name, target in models.items():
            if isinstance(target, DeploymentHandle):
                self.remote[name] = target
            else:
                self.local[name] = ModelServer(target["bundle"], target["settings"])
        self.limits = dict(settings["max_body_mb"])
        self.timeouts = dict(settings["request_timeout_s"])
        self._digest = _token_digest(settings)

    def reconfigure(self, config: dict[str, Any]) -> None:
        for server in self.local.values():
            server.reconfigure(config)

    def _denied(self, request: Request) -> JSONResponse | None:
        if self._digest is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            hashlib.sha256(given.strip().encode()).digest(), self._digest
        )
        if ok:
            return None
        return JSONResponse(
            {"error": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )

    def _unknown(self, name: str) -> JSONResponse | None:
        if name in self.local or name in self.remote:
            return None
        known = ", ".join(sorted([*self.local, *self.remote]))
        return JSONResponse({"error": f"unknown model {name!r}; served: {known}"}, status_code=404)

    async def _call(self, name: str, method: str, *args: Any) -> Any:
        if name in self.local:
            result = getattr(self.local[name], method)(*args)
            return await result if asyncio.iscoroutine(result) else result
        return await getattr(self.remote[name], method).remote(*args)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: answers without a token."""
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Any:
        """Every served model with its heads, labels and input spec."""
        if denied := self._denied(request):
            return denied
        names = sorted([*self.local, *self.remote])
        return {"models": [await self._call(name, "info") for name in names]}

    @api.get("/v1/models/{name}")
    async def model_info(self, name: str, request: Request) -> Any:
        """One model's manifest summary: heads, labels, input spec, batching."""
        if denied := self._denied(request) or self._unknown(name):
            return denied
        return await self._call(name, "info")

    @api.get("/v1/models/{name}/stats")
    async def model_stats(self, name: str, request: Request) -> Any:
        """Batch sizes this replica has run (for checking that batching forms batches)."""
        if denied := self._denied(request) or self._unknown(name):
            return denied
        return await self._call(name, "stats")

    @api.post("/v1/models/{name}:predict", openapi_extra=_PREDICT_DOC)
    async def predict(self, name: str, request: Request) -> Any:
        """Predict: JSON {"inputs": [...]} or multipart image files; per-head outputs and top-k labels."""
        if denied := self._denied(request) or self._unknown(name):
            return denied
        start = time.perf_counter()
        try:
            body = await _read_body(request, self.limits[name])
        except InputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        read = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        try:
            status, payload, timings = await asyncio.wait_for(
                self._call(name, "predict", content_type, body), self.timeouts[name] + 5
            )
        except TimeoutError:
            status, payload, timings = 504, {"error": f"prediction took longer than {self.timeouts[name]} s"}, {}
        timings = {"read": (read - start) * 1000, **timings, "total": (time.perf_counter() - start) * 1000}
        header = ", ".join(f"{key};dur={value:.2f}" for key, value in timings.items())
        return JSONResponse(payload, status_code=status, headers={"Server-Timing": header})

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        if denied := self._denied(request):
            return denied
        return api.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        if denied := self._denied(request):
            return denied
        root = request.scope.get("root_path", "")
        return HTMLResponse(get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="surgery").body)


# --------------------------------------------------------------------------- the builder


def build_app(args: dict[str, Any]) -> Application:
    """The application a Serve config names (`import_path: serve.app:build_app`)."""
    parsed = AppArgs.model_validate(args)
    bundles = [str(Path(b).resolve()) for b in parsed.bundles]
    names: dict[str, str] = {}
    models: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    limits: dict[str, float] = {}
    timeouts: dict[str, float] = {}
    for bundle in bundles:
        name = read_manifest(bundle)["name"]
        if name in names:
            raise BundleError(f"two bundles are named {name!r} ({names[name]} and {bundle}); serve them separately")
        names[name] = bundle
        section = read_serve_section(bundle)
        settings = model_settings(parsed, section)
        models[name] = {"bundle": bundle, "settings": {k: v for k, v in settings.items() if k not in BATCH_KEYS}}
        options[name] = deployment_options(parsed, section, settings)
        limits[name] = settings["max_body_mb"]
        timeouts[name] = settings["request_timeout_s"]
    ingress_settings = {
        "max_body_mb": limits,
        "request_timeout_s": timeouts,
        "token_file": parsed.token_file,
        "token_sha256": parsed.token_sha256,
    }
    if len(models) == 1:
        (name,) = models
        return SurgeryAPI.options(**options[name]).bind(models, ingress_settings)
    handles = {
        name: ModelDeployment.options(name=model_deployment_name(name), **options[name]).bind(
            target["bundle"], target["settings"]
        )
        for name, target in models.items()
    }
    most = max(o["max_ongoing_requests"] for o in options.values())
    return SurgeryAPI.options(max_ongoing_requests=most * len(models), ray_actor_options={"num_cpus": 0}).bind(
        handles, ingress_settings
    )


def model_deployment_name(name: str) -> str:
    return f"model-{name}"

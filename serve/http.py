"""The HTTP face of the app: routes for `/v1`, the Open Inference Protocol `/v2` and `/metrics`,
the bearer token, request bodies read within their limit, JSON errors, and requests whose client
has gone cancelled.

(No `from __future__ import annotations` here: FastAPI reads the route signatures' types.) The `SurgeryAPI` deployment holds the models it serves itself or handles to
their own deployments (`serve.app` builds that graph)."""

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import metrics, openapi, v2
from serve.config import INGRESS_NAME
from serve.decode import InputError
from serve.responses import server_timing
from serve.runtime import Answer, ModelServer
from serve.tokens import read_token

logger = logging.getLogger("ray.serve")

CLIENT_GONE = 499  # nginx's name for it; logged and counted, never seen by the client

api = FastAPI(
    title="surgery",
    description="Predictions from exported surgery bundles: `/v1` and the Open Inference Protocol (`/v2`). "
    'Every error is `{"error": "..."}` with its status.',
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    # Starlette would answer `/v1/models/x/` with a 307 to a URL built from the Host header: a
    # route that does not match is a 404, never a redirect
    redirect_slashes=False,
)
# Ray ships the app to replicas by value: state the routes and the middleware share lives on it
api.state.metrics = metrics.AppMetrics()


class _Measured:
    """ASGI middleware counting every response by route template and status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [CLIENT_GONE]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            scope["app"].state.metrics.observe(route, status[0], time.perf_counter() - start)


api.add_middleware(_Measured)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Both protocols' error body: {"error": message}."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:3])
    return error(400, f"invalid request ({where})")


@api.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return error(500, "internal error (see the server log)")


def openapi_document() -> dict[str, Any]:
    """What `/openapi.json` serves: the routes with the statuses they answer (no 422)."""
    return openapi.without_validation_errors(api.openapi())


def token_digest(settings: dict[str, Any]) -> bytes | None:
    if settings.get("token_sha256"):
        return bytes.fromhex(settings["token_sha256"])
    token = read_token(settings.get("token_file"))
    return hashlib.sha256(token.encode()).digest() if token else None


def token_ok(authorization: str, digest: bytes | None) -> bool:
    """Whether an Authorization header carries the bearer token with this sha256 (always, without one)."""
    if digest is None:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), digest)


async def read_body(request: Request, limit_mb: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit."""
    limit = int(limit_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit() and len(declared) <= 20):
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


def _unknown_version(version: str) -> JSONResponse | None:
    return None if version == "1" else error(404, f"unknown model version {version!r}; served: 1")


async def _client_gone(request: Request) -> None:
    """Returns once the client disconnects (the body has been read: only that message is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def while_connected(request: Request, work: Any) -> Any:
    """Await `work` unless the client disconnects first; then cancel it (its decoding stops at
    the next input, its rows leave the batch queue) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


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
        self._digest = token_digest(settings)

    def reconfigure(self, config: dict[str, Any]) -> None:
        for server in self.local.values():
            server.reconfigure(config)

    # ------------------------------------------------------------------ helpers

    def _denied(self, request: Request) -> JSONResponse | None:
        if token_ok(request.headers.get("authorization", ""), self._digest):
            return None
        return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    def _unknown(self, name: str) -> JSONResponse | None:
        if name in self.local or name in self.remote:
            return None
        known = ", ".join(sorted([*self.local, *self.remote]))
        return error(404, f"unknown model {name!r}; served: {known}")

    def _names(self) -> list[str]:
        return sorted([*self.local, *self.remote])

    async def _call(self, name: str, method: str, *args: Any) -> Any:
        if name in self.local:
            result = getattr(self.local[name], method)(*args)
            return await result if asyncio.iscoroutine(result) else result
        return await getattr(self.remote[name], method).remote(*args)

    async def _answer(self, name: str, request: Request, method: str, *args: Any) -> Response:
        """Read the body within its limit, hand it to the model, and answer with timings."""
        start = time.perf_counter()
        timeout = self.timeouts[name]  # the whole request's: its body, then its prediction
        try:
            # a body trickling in slower than the model's time limit is cut off, not waited for
            body = await asyncio.wait_for(read_body(request, self.limits[name]), timeout)
            call_args = (
                (body, v2.header_length(request.headers.get(v2.HEADER_LENGTH)))
                if method == "infer_v2"
                else (*args, body)
            )
        except InputError as exc:
            return error(exc.status, str(exc))
        except TimeoutError:
            return error(408, f"request body not received within {timeout:g} s")
        read = time.perf_counter()
        try:
            answer: Answer | None = await asyncio.wait_for(
                while_connected(request, self._call(name, method, *call_args)), max(0.0, timeout - (read - start))
            )
        except TimeoutError:
            return error(504, f"prediction took longer than {timeout:g} s")
        if answer is None:  # the client is gone: nobody reads this
            return Response(status_code=CLIENT_GONE)
        timings = {"read": (read - start) * 1000, **answer.timings, "total": (time.perf_counter() - start) * 1000}
        headers = {**answer.headers, "Server-Timing": server_timing(timings)}
        return Response(answer.body, status_code=answer.status, media_type=answer.media_type, headers=headers)

    # ------------------------------------------------------------------ /v1 and health

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: answers without a token."""
        return {"status": "ok"}

    @api.get("/v1/models", responses=openapi.GUARDED)
    async def list_models(self, request: Request) -> Any:
        """Every served model with its heads, labels and input spec."""
        if denied := self._denied(request):
            return denied
        return {"models": [await self._call(name, "info") for name in self._names()]}

    @api.get("/v1/models/{name}", responses=openapi.MODEL)
    async def model_info(self, name: str, request: Request) -> Any:
        """One model's manifest summary: heads, labels, input spec, batching."""
        if denied := self._denied(request) or self._unknown(name):
            return denied
        return await self._call(name, "info")

    @api.get("/v1/models/{name}/stats", responses=openapi.MODEL)
    async def model_stats(self, name: str, request: Request) -> Any:
        """Batch sizes this replica has run (for checking that batching forms batches)."""
        if denied := self._denied(request) or self._unknown(name):
            return denied
        return await self._call(name, "stats")

    @api.post("/v1/models/{name}:predict", openapi_extra=openapi.PREDICT_BODY, responses=openapi.PREDICT)
    async def predict(self, name: str, request: Request) -> Any:
        """Predict: JSON {"inputs": [...]} or multipart image files; per-head outputs and top-k labels."""
        if denied := self._denied(request) or self._unknown(name):
            return denied
        return await self._answer(name, request, "predict", request.headers.get("content-type", ""))

    # ------------------------------------------------------------------ the Open Inference Protocol

    @api.get("/v2", responses=openapi.GUARDED)
    async def v2_server(self, request: Request) -> Any:
        """Server metadata: name, version, protocol extensions."""
        if denied := self._denied(request):
            return denied
        return v2.server_metadata()

    @api.get("/v2/health/live")
    async def v2_live(self) -> dict[str, bool]:
        """Liveness (no token needed)."""
        return {"live": True}

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> dict[str, bool]:
        """Readiness: every model of this app is loaded (no token needed)."""
        return {"ready": True}

    @api.get("/v2/models/{name}", responses=openapi.MODEL)
    @api.get("/v2/models/{name}/versions/{version}", responses=openapi.MODEL)
    async def v2_model(self, name: str, request: Request, version: str = "1") -> Any:
        """Model metadata: inputs and outputs with datatypes and shapes (-1: any size)."""
        if denied := self._denied(request) or self._unknown(name) or _unknown_version(version):
            return denied
        return await self._call(name, "metadata_v2")

    @api.get("/v2/models/{name}/ready", responses=openapi.MODEL)
    @api.get("/v2/models/{name}/versions/{version}/ready", responses=openapi.MODEL)
    async def v2_model_ready(self, name: str, request: Request, version: str = "1") -> Any:
        """Model readiness (needs the token when one is set: it says which models exist)."""
        if denied := self._denied(request) or self._unknown(name) or _unknown_version(version):
            return denied
        return {"name": name, "ready": True}

    @api.post("/v2/models/{name}/infer", openapi_extra=openapi.INFER_BODY, responses=openapi.INFER)
    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=openapi.INFER_BODY, responses=openapi.INFER)
    async def v2_infer(self, name: str, request: Request, version: str = "1") -> Any:
        """Inference with typed tensors, JSON or with the binary tensor data extension."""
        if denied := self._denied(request) or self._unknown(name) or _unknown_version(version):
            return denied
        return await self._answer(name, request, "infer_v2")

    # ------------------------------------------------------------------ metrics and docs

    @api.get("/metrics", response_class=PlainTextResponse, responses=openapi.GUARDED)
    async def metrics(self, request: Request) -> Any:
        """Prometheus metrics of this replica (needs the token when one is set)."""
        if denied := self._denied(request):
            return denied
        stats = {name: await self._call(name, "stats") for name in self._names()}
        return Response(request.app.state.metrics.render(stats), media_type=metrics.CONTENT_TYPE)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        if denied := self._denied(request):
            return denied
        return openapi_document()

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        if denied := self._denied(request):
            return denied
        root = request.scope.get("root_path", "")
        return HTMLResponse(get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="surgery").body)

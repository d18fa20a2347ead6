"""The Ray Serve application graph: HTTP in front of exported bundles, with dynamic batching.

One application serves every bundle given to it. With a single bundle the FastAPI ingress *is*
the model deployment (no handle hop between proxy and model, which is what keeps batch-1
latency and throughput close to the raw model on a small machine). With several bundles a thin
ingress routes each request, as raw bytes, to one model deployment per bundle so each model
scales on its own. Either way the same `ModelServer` (serve.runtime) decodes, validates,
batches and predicts, and the same routes (serve.http) speak `/v1` and the Open Inference
Protocol.

The parts, each readable alone: `serve.config` (arguments and deployment options), `serve.decode`
(request bodies to rows), `serve.responses` (`/v1` bodies), `serve.v2` (the Open Inference
Protocol), `serve.cores` (sharing cores between replicas), `serve.runtime` (the model runtime),
`serve.http` (routes, token, limits), `serve.metrics` (Prometheus). Nothing here imports
training code: a bundle (`surgery.bundle`) and the shared preprocessing are all a replica reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serve.config import (
    BATCH_KEYS,
    CONSTRUCTOR_RETRIES,
    AppArgs,
    check_runtimes,
    deployment_options,
    model_deployment_name,
    model_settings,
    serve_section,
)
from serve.http import SurgeryAPI
from serve.runtime import Answer, ModelServer
from surgery.bundle import read_manifest
from surgery.errors import BundleError
from surgery.formats import verify_formats


@serve.deployment(name="model")
class ModelDeployment:
    """A model behind the multi-model ingress (one deployment per bundle)."""

    def __init__(self, bundle: str, settings: dict[str, Any]) -> None:
        self.server = ModelServer(bundle, settings)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.server.reconfigure(config)

    async def predict(self, content_type: str, body: bytes) -> Answer:
        return await self.server.predict(content_type, body)

    async def infer_v2(self, body: bytes, header_length: int | None) -> Answer:
        return await self.server.infer_v2(body, header_length)

    def info(self) -> dict[str, Any]:
        return self.server.info()

    def metadata_v2(self) -> dict[str, Any]:
        return self.server.metadata_v2()

    def stats(self) -> dict[str, Any]:
        return self.server.stats()


def build_app(args: dict[str, Any]) -> Application:
    """The application a Serve config names (`import_path: serve.app:build_app`)."""
    parsed = AppArgs.model_validate(args)
    check_runtimes(parsed)  # a runtime a bundle cannot run fails here, before any replica starts
    bundles = [str(Path(b).resolve()) for b in parsed.bundles]
    names: dict[str, str] = {}
    models: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    limits: dict[str, float] = {}
    timeouts: dict[str, float] = {}
    for bundle in bundles:
        manifest = read_manifest(bundle)
        verify_formats(Path(bundle), manifest)  # before deploy: what /v1/models lists is there
        name = manifest["name"]
        if name in names:
            raise BundleError(f"two bundles are named {name!r} ({names[name]} and {bundle}); serve them separately")
        names[name] = bundle
        section = serve_section(bundle)
        settings = model_settings(parsed, section)
        models[name] = {"bundle": bundle, "settings": {k: v for k, v in settings.items() if k not in BATCH_KEYS}}
        options[name] = {
            "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
            **deployment_options(parsed, section, settings),
        }
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
    return SurgeryAPI.options(
        max_ongoing_requests=most * len(models),
        ray_actor_options={"num_cpus": 0},
        max_constructor_retry_count=CONSTRUCTOR_RETRIES,
    ).bind(handles, ingress_settings)

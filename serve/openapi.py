"""The app's OpenAPI document: the request bodies FastAPI cannot infer (the routes read raw bodies
within their limits), and the statuses each route really answers, every error with the one JSON
body both protocols use. FastAPI would document a 422 for every route with a path parameter; the
app never answers one (a request that fails validation is a 400), so it is taken out.

(No `from __future__ import annotations` here: FastAPI reads `ErrorBody`'s types.)"""

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error the server answers, HAProxy's own included: `{"error": "..."}`."""

    error: str = Field(description="What went wrong, in one line.")


_WHY = {
    400: "The request is malformed or does not fit the model; `error` names the input and the problem.",
    401: "The server has a bearer token, and the request's Authorization header does not carry it.",
    404: "No such model, model version or route.",
    408: "The request body did not arrive within the model's `request_timeout_s`.",
    413: "The body, an image's pixel count or the number of inputs is over its limit.",
    415: "The content type is not JSON, multipart/form-data or an image.",
    500: "A server bug (logged with its traceback there); the replica keeps serving.",
    504: "The prediction took longer than the model's `request_timeout_s`.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these error statuses, each with the JSON error body."""
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


GUARDED = errors(401)
MODEL = errors(401, 404)
PREDICT = errors(400, 401, 404, 408, 413, 415, 500, 504)
INFER = {
    200: {
        "description": "One output per head: JSON, or (binary tensor data extension) a JSON header of "
        "Inference-Header-Content-Length bytes followed by the outputs' bytes.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **errors(400, 401, 404, 408, 413, 500, 504),
}

PREDICT_BODY = {
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
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": {"type": "object"}},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: a JSON header of Inference-Header-Content-Length "
                "bytes, then the inputs' binary data.",
            },
        },
    }
}


def without_validation_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document without the 422 responses (and their schemas) the app never sends."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema

"""`surgery predict`: a small client for the serving endpoint."""

from __future__ import annotations

import base64
import json
import mimetypes
from pathlib import Path
from typing import Any

import httpx

from serve.tokens import TOKEN_ENV, read_token
from surgery.errors import SurgeryError


def _predict_url(url: str, client: httpx.Client, headers: dict[str, str]) -> str:
    """`.../v1/models/NAME[:predict]`, or a bare server URL when it serves exactly one model."""
    url = url.rstrip("/")
    if url.endswith(":predict"):
        return url
    if "/v1/models/" in url:
        return url + ":predict"
    listing = _checked(client.get(url + "/v1/models", headers=headers))
    names = [m["name"] for m in listing.get("models", [])]
    if len(names) != 1:
        raise SurgeryError(f"{url} serves {len(names)} models ({', '.join(names)}); use {url}/v1/models/NAME")
    return f"{url}/v1/models/{names[0]}:predict"


def _checked(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text.strip()[:200]}
    if response.status_code >= 400:
        raise SurgeryError(f"server answered {response.status_code}: {payload.get('error', payload)}")
    return payload


# Inputs named like these are meant as files: a missing one is an error, never sent as text.
FILE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".json", ".npy", ".txt"}


def _kind_of_path(text: str) -> str | None:
    """ "file" or "folder" for an existing one, else None. Text no file system takes as a name (a
    part over 255 bytes, a NUL) is data, not a path: asking the OS would raise `OSError`."""
    try:
        path = Path(text)
        return "folder" if path.is_dir() else "file" if path.is_file() else None
    except (OSError, ValueError):
        return None


def _parse_input(text: str) -> tuple[str, Any]:
    """("file", Path) for an existing file, ("json", value) for a JSON array, else ("text", str);
    a missing file (named like one) is an error."""
    path = Path(text)
    kind = _kind_of_path(text)
    if kind == "folder":
        raise SurgeryError(f"{text}: is a folder; give image files, text strings or JSON arrays")
    if kind is None and _looks_like_a_file(text):
        raise SurgeryError(f"{text}: no such file")
    if kind == "file":
        if path.suffix.lower() == ".json":
            try:
                return "json", json.loads(path.read_text())
            except ValueError as exc:
                raise SurgeryError(f"{path}: not valid JSON ({exc})") from None
        return "file", path
    if text.lstrip().startswith("["):
        try:
            return "json", json.loads(text)
        except ValueError as exc:
            raise SurgeryError(f"input {text[:40]!r}: looks like a JSON array but does not parse ({exc})") from None
    return "text", text


def _looks_like_a_file(text: str) -> bool:
    if not text or any(c.isspace() for c in text):
        return False
    return Path(text).suffix.lower() in FILE_SUFFIXES or "/" in text or text.startswith(("~", "."))


def _format(payload: dict[str, Any], labels: list[str]) -> str:
    lines = []
    for label, prediction in zip(labels, payload.get("predictions", []), strict=False):
        lines.append(f"{label}:")
        for head, result in prediction.items():
            if "top_k" in result:
                ranked = ", ".join(f"{r['label']} {r['probability']:.3f}" for r in result["top_k"])
                if "labels" in result:  # a multilabel head: the labels it predicts (over 0.5), then its ranking
                    ranked = f"[{', '.join(result['labels'])}] {ranked}"
                lines.append(f"  {head}: {ranked}")
            else:
                values = ", ".join(f"{v:.4g}" for v in result["output"][:16])
                more = " ..." if len(result["output"]) > 16 else ""
                lines.append(f"  {head}: [{values}{more}]")
    return "\n".join(lines)


def predict_command(url: str, inputs: list[str], *, token_file: Path | None = None) -> str:
    """Send image files, text strings or JSON arrays to a served model; the predictions, readable."""
    if not inputs:
        raise SurgeryError("give at least one input (an image file, a text string or a JSON array)")
    token = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    parsed = [_parse_input(text) for text in inputs]
    labels = [str(value) if kind == "file" else f"input {i + 1}" for i, (kind, value) in enumerate(parsed)]
    try:
        with httpx.Client(timeout=120) as client:
            predict_url = _predict_url(url, client, headers)
            if all(kind == "file" for kind, _ in parsed):
                files = [
                    ("file", (p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream"))
                    for _, p in parsed
                ]
                response = client.post(predict_url, files=files, headers=headers)
            else:
                body = []
                for kind, value in parsed:
                    if kind == "file":
                        body.append(base64.b64encode(value.read_bytes()).decode())
                    elif kind == "json" and isinstance(value, dict) and "inputs" in value:
                        body.extend(value["inputs"])
                    else:
                        body.append(value)
                response = client.post(predict_url, json={"inputs": body}, headers=headers)
            payload = _checked(response)
    except httpx.HTTPError as exc:
        raise SurgeryError(
            f"cannot reach {url}: {exc} (is `surgery serve` running? token via --token-file or ${TOKEN_ENV})"
        ) from None
    return _format(
        payload,
        labels
        if len(labels) == len(payload.get("predictions", []))
        else [f"input {i + 1}" for i in range(len(payload.get("predictions", [])))],
    )

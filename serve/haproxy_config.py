"""Ray's HAProxy configuration, rewritten before HAProxy reads it: listeners on loopback, the
client timeouts a slow client must meet, a per-client connection limit, and JSON error bodies.

Standard library only: `serve.ingress` writes a small wrapper that Ray starts in HAProxy's place;
it loads this file by path (in an isolated interpreter), rewrites the configuration Ray wrote and
runs the real HAProxy on it. Every status a client can get has the app's error body
`{"error": "..."}`:

- the app's own errors have it;
- HAProxy's own (a slow or malformed request, no replica up) come from `errorfile`s written here;
- a text error from behind HAProxy (Ray's replica HTTP server answers 408 once Ray's own request
  timeout passes, 503 when a replica is overloaded, 500 when one died; uvicorn answers 400 to a
  request it cannot parse) is replaced by an `http-response return` rule; Ray's 408 becomes the
  504 the app answers for a prediction that took too long;
- Ray's own `http-request return` answers in text (404 for an unrouted path, 503 from its health
  check) are rewritten to answer JSON.

The rewrite is idempotent: a reload (or a second wrapper) rewrites an already rewritten file to
the same text.
"""

from __future__ import annotations

import http
import json
import re
import sys
from pathlib import Path
from typing import Any

ERRORS = {  # every status `errorfile` takes but 200
    400: "bad request: the HTTP request is malformed",
    401: "unauthorized",
    403: "forbidden",
    404: "Not Found",
    405: "method not allowed",
    407: "proxy authentication required",
    408: "request not received in time: its headers, and a body up to 16 kB, must arrive within {http_request_s} s",
    410: "gone",
    413: "request too large",
    425: "too early",
    429: "too many requests",
    500: "internal error (see the server log)",
    501: "not implemented",
    502: "bad gateway: a model replica closed the connection or answered nonsense",
    503: "no model replica is ready to answer (starting, restarting or overloaded); retry shortly",
    504: "the model did not answer within the request timeout",
}
RAY_TIMEOUT = "ray-timeout"  # Ray's 408: a prediction that took too long, answered as the app's 504
RAY_TIMEOUT_MESSAGE = "prediction took longer than the request timeout"

_LIMIT = (
    "    stick-table type ip size 100k expire 60s store conn_cur\n"
    "    tcp-request connection track-sc0 src\n"
    "    tcp-request connection reject if {{ sc0_conn_cur gt {per_client} }}\n"
)
_OURS = re.compile(
    r"(?m)^    (stick-table type ip size 100k expire 60s store conn_cur|tcp-request connection (track-sc0 src"
    r"|reject if \{ sc0_conn_cur gt \d+ \})|http-response return status \d+ content-type application/json file .*"
    r"|errorfile \d+ .*|timeout (client|http-request|http-keep-alive) .*|option http-buffer-request)\n"
)
_ANY_ERRORFILE = re.compile(r"(?m)^\s*errorfile \d+ .*\n")
_ANY_CLIENT_TIMEOUT = re.compile(
    r"(?m)^\s*(timeout (client|http-request|http-keep-alive) .*|option http-buffer-request)\n"
)
_TEXT_RETURN = re.compile(
    r'(?m)^(\s*http-request return status ([45]\d\d) content-type )"?text/plain"? (?:lf-)?string "(?:[^"\\]|\\.)*"'
)


def error_bodies(folder: Path, http_request_s: int) -> dict[str, dict[str, str]]:
    """Write the JSON error bodies into `folder` (in a private state folder): per status a JSON
    body (for `http-response return ... file`) and a whole HTTP response (for `errorfile`).
    Returns their paths, by kind and status (as strings: the wrapper holds them as a literal)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    paths: dict[str, dict[str, str]] = {"json": {}, "errorfile": {}}
    for status, message in [*ERRORS.items(), (RAY_TIMEOUT, RAY_TIMEOUT_MESSAGE)]:
        body = json.dumps({"error": message.format(http_request_s=http_request_s)}).encode()
        (folder / f"{status}.json").write_bytes(body)
        paths["json"][str(status)] = str(folder / f"{status}.json")
        if isinstance(status, int):
            head = (
                f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
                f"Cache-Control: no-cache\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            (folder / f"{status}.http").write_bytes(head.encode() + body)
            paths["errorfile"][str(status)] = str(folder / f"{status}.http")
    return paths


def rewrite(text: str, settings: dict[str, Any]) -> str:
    """Ray's configuration `text` with our listeners, timeouts, limit and error bodies.
    `settings`: `timeouts` (HAProxy timeout name → seconds), `per_client` (0: no limit) and
    `errors` (from `error_bodies`)."""
    errors = settings["errors"]
    text = re.sub(r"(?m)^(\s*bind\s+)\*?:", r"\g<1>127.0.0.1:", text)
    text = _OURS.sub("", _ANY_CLIENT_TIMEOUT.sub("", _ANY_ERRORFILE.sub("", text)))
    defaults = "".join(f"    timeout {name} {value}s\n" for name, value in settings["timeouts"].items())
    defaults += "    option http-buffer-request\n"
    defaults += "".join(f"    errorfile {status} {path}\n" for status, path in errors["errorfile"].items())
    text = re.sub(r"(?m)^defaults\n", lambda m: m.group(0) + defaults, text, count=1)
    text = _TEXT_RETURN.sub(lambda m: _json_return(m, errors["json"]), text)
    frontend = _LIMIT.format(per_client=settings["per_client"]) if settings["per_client"] else ""
    frontend += _json_responses(errors["json"])
    text, found = re.subn(
        r"(?m)^frontend http_frontend\n\s*bind [^\n]*\n", lambda m: m.group(0) + frontend, text, count=1
    )
    if not found:
        print(
            "surgery: no `frontend http_frontend` in Ray's HAProxy configuration: the per-client connection "
            "limit and JSON error bodies are not applied",
            file=sys.stderr,
        )
    return text


def _json_return(match: re.Match[str], bodies: dict[str, str]) -> str:
    status = match.group(2)
    if status not in bodies:
        return match.group(0)
    return f"{match.group(1)}application/json file {bodies[status]}"


def _json_responses(bodies: dict[str, str]) -> str:
    """`http-response return` rules replacing a non-JSON error from a server with the JSON one."""
    not_json = "!{ res.hdr(content-type) -m sub json }"
    rules = [
        f"    http-response return status 504 content-type application/json file {bodies[RAY_TIMEOUT]}"
        f" if {{ status 408 }} {not_json}\n"
    ]
    for status, path in bodies.items():
        if status.isdigit() and status != "408":
            rules.append(
                f"    http-response return status {status} content-type application/json file {path}"
                f" if {{ status {status} }} {not_json}\n"
            )
    return "".join(rules)

"""`wrk` (a C HTTP load generator) driving the serving benchmarks' throughput phases.

A load generator written in Python, on the same 2 cores as the servers, measures itself as much
as them; `wrk` spends a few microseconds per request in C. The requests are POSTs of prepared
bodies (cycled through, as `benchmarks/loadgen.py` does) from a small Lua script written to a
temporary folder; the script's `done` prints one JSON line with the counts wrk keeps (requests,
non-2xx/3xx answers, socket errors), latency percentiles and, when asked, the batch size each
answer reports (`"batch_sizes":[N` in a `/v1` body). Any answer outside 2xx/3xx, and any socket
error, fails the measurement with wrk's own report: a rate of error pages measures nothing.

    client = pick_client(requested)              # "wrk" or "lean", with a printed note
    result = load(url, bodies, headers, clients, seconds, batch_sizes=False)
    result.rps, result.latency_ms[50], result.batch_sizes
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

WRK = "/usr/bin/wrk"
CLIENTS = ("wrk", "lean")
PERCENTILES = (50, 75, 90, 99)

# Every thread reads the bodies, prepares its requests once and cycles through them; `response`
# (only when batch sizes are wanted: wrk then reads every body) keeps the first batch size of each.
_SCRIPT = """
local files = {files}
local headers = {headers}
local path = {path}
local want_batches = {want_batches}
local requests, k = {{}}, 0
batch_sum, batch_count = 0, 0

function init(args)
  for i, name in ipairs(files) do
    local f = assert(io.open(name, "rb"))
    local body = f:read("*a")
    f:close()
    requests[i] = wrk.format("POST", path, headers, body)
  end
  k = id or 0  -- set by setup: threads start at different bodies
end

function request()
  k = k % #requests + 1
  return requests[k]
end

if want_batches then
  function response(status, hdrs, body)
    local n = body and body:match('"batch_sizes":%s*%[%s*(%d+)')
    if n then
      batch_sum = batch_sum + tonumber(n)
      batch_count = batch_count + 1
    end
  end
end

local threads = {{}}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function done(summary, latency, requests_)
  local bsum, bcount = 0, 0
  for _, t in ipairs(threads) do
    bsum = bsum + (t:get("batch_sum") or 0)
    bcount = bcount + (t:get("batch_count") or 0)
  end
  local e = summary.errors
  local p = {{}}
  for _, q in ipairs({{{percentiles}}}) do
    table.insert(p, string.format('"%d": %.3f', q, latency:percentile(q) / 1000))
  end
  io.write(string.format(
    'WRK_RESULT {{"requests": %d, "duration_us": %d, "status_errors": %d, "connect": %d, "read": %d, '
      .. '"write": %d, "timeout": %d, "batch_sum": %d, "batch_count": %d, "latency_ms": {{%s}}}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    bsum, bcount, table.concat(p, ", ")))
end
"""


class WrkError(RuntimeError):
    pass


@dataclass
class WrkResult:
    rps: float
    requests: int
    latency_ms: dict[int, float]  # percentile -> ms
    mean_batch: float | None = None  # over the answers (with `batch_sizes`), else None
    report: str = ""  # wrk's own output


def available() -> bool:
    return Path(WRK).exists() or shutil.which("wrk") is not None


def pick_client(requested: str | None) -> str:
    """`requested`, or wrk where it is installed and else the lean Python client (said so)."""
    if requested is not None:
        if requested == "wrk" and not available():
            raise SystemExit(f"--client wrk: no wrk at {WRK} or on PATH (apt-get install wrk)")
        return requested
    if available():
        return "wrk"
    print(f"note: no wrk at {WRK} or on PATH; the lean Python load generator (benchmarks/loadgen.py) drives the load")
    return "lean"


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua one for these (ASCII) values


def _executable() -> str:
    return WRK if Path(WRK).exists() else (shutil.which("wrk") or WRK)


def load(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    clients: int,
    seconds: float,
    batch_sizes: bool = False,
    threads: int = 1,
    timeout_s: int = 60,
) -> WrkResult:
    """Requests/s, latency percentiles and (with `batch_sizes`) the mean batch size the answers
    report, with `clients` keep-alive connections posting `bodies` in turn for `seconds` (whole
    seconds, at least one: wrk's resolution). One wrk thread is plenty on a small machine and
    leaves the cores to the servers."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    with tempfile.TemporaryDirectory(prefix="wrk-") as folder:
        files = []
        for i, body in enumerate(bodies):
            file = Path(folder) / f"body{i}"
            file.write_bytes(body)
            files.append(str(file))
        script = Path(folder) / "post.lua"
        lua_headers = "{" + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()) + "}"
        script.write_text(
            _SCRIPT.format(
                files="{" + ", ".join(_lua_string(f) for f in files) + "}",
                headers=lua_headers,
                path=_lua_string(path),
                want_batches="true" if batch_sizes else "false",
                percentiles=", ".join(str(p) for p in PERCENTILES),
            )
        )
        duration = max(1, math.ceil(seconds))
        threads = max(1, min(threads, clients))
        command = [
            _executable(),
            f"-t{threads}",
            f"-c{clients}",
            f"-d{duration}s",
            f"--timeout={timeout_s}s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + timeout_s + 30)
    report = done.stdout + done.stderr
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise WrkError(f"wrk failed (exit {done.returncode}):\n{report}")
    counts = json.loads(line.removeprefix("WRK_RESULT "))
    socket_errors = {k: counts[k] for k in ("connect", "read", "write", "timeout") if counts[k]}
    if counts["status_errors"] or socket_errors or counts["requests"] == 0:
        raise WrkError(
            f"{url}: {counts['status_errors']} answers outside 2xx/3xx, socket errors {socket_errors or 'none'}, "
            f"{counts['requests']} requests; the measurement is void. wrk said:\n{report}"
        )
    mean_batch = counts["batch_sum"] / counts["batch_count"] if counts["batch_count"] else None
    return WrkResult(
        rps=counts["requests"] / (counts["duration_us"] / 1e6),
        requests=counts["requests"],
        latency_ms={int(k): v for k, v in counts["latency_ms"].items()},
        mean_batch=mean_batch,
        report=report,
    )

"""Shared test set-up: nothing waits on a network that isn't there."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

PER_CLIENT_LIMIT = 64  # connections one client address may hold at once through the tests' HAProxy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# surgery's cache (fetched recipes, remembered image checks) in a folder of this run, not the user's
if "SURGERY_CACHE_DIR" not in os.environ:
    os.environ["SURGERY_CACHE_DIR"] = tempfile.mkdtemp(prefix="surgery-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SURGERY_CACHE_DIR"], ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """Call it for a TCP port nothing listens on right now (servers in tests bind 127.0.0.1)."""
    return _free_port


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray (starting one costs seconds).
    Serve on it uses the HAProxy ingress, as `surgery serve` does by default."""
    import ray

    from serve.ingress import REPLICA_ENV, haproxy_environment, state_folder

    # a per-client connection limit small enough for a test to reach
    ingress = haproxy_environment(str(os.getpid()), max_connections_per_client=PER_CLIENT_LIMIT)
    os.environ.update(ingress)
    os.environ.update(REPLICA_ENV)  # replicas run as under `surgery serve`
    ray.init(
        address="local",  # never a detached `surgery serve` (or other `ray start`) found on this machine
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
        if state := state_folder(ingress):
            import shutil

            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_http(ray_session) -> str:
    """Ray Serve's HTTP ingress on 127.0.0.1, started once: Serve keeps the `http_options` it was
    first started with, so every test module that deploys apps shares this one (its base URL)."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    return f"http://127.0.0.1:{port}"


TINY_BERT_WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "the", "surgical", "example", "cat", "sat", "on", "mat", "good", "bad", "movie", "very",
]  # fmt: skip


# a served text model over `make_tiny_bert`'s folder: `TINY_BERT_RECIPE.format(folder=...)`
TINY_BERT_RECIPE = """
name: tinytext
backbone: {{source: transformers, name: {folder}, pretrained: false}}
input: {{max_length: 16}}
heads:
  - name: sentiment
    input: tokens
    pool: cls
    layers: [{{linear: {{out_features: 2}}}}]
    loss: cross_entropy
    labels: [neg, pos]
"""


def make_tiny_bert(folder: Path) -> Path:
    """A real transformers model folder: a 2-layer, 32-wide BERT (seeded) with its own small
    WordPiece tokenizer. Tests that build, train, export or serve text models all use this one."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(TINY_BERT_WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(TINY_BERT_WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny BERT folder shared by the session (tests that delete or change it make their own
    with `make_tiny_bert`)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def http_folder():
    """Serve folders as static files on 127.0.0.1 (a remote library or archive host, in-process):
    call it with a folder, get back its base URL ending in '/'; `.stop(url)` takes that server
    down (the host goes offline)."""
    import functools
    import http.server
    import threading

    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    def serve(folder: Path) -> str:
        handler = functools.partial(Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    def stop(url: str) -> None:
        for server in [s for s in servers if url.startswith(f"http://127.0.0.1:{s.server_address[1]}/")]:
            server.shutdown()
            server.server_close()
            servers.remove(server)

    serve.stop = stop
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def surgery_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run `surgery ARGS` as a user does (a subprocess of the console script's module)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), **(env or {})},
    )


def write_digit_folder(folder: Path, count: int = 40) -> Path:
    """A class-per-folder set of 8×8 digit PNGs (sklearn's digits): data a user evaluates on."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        target = folder / str(digits.target[i])
        target.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 255 / 16).round().clip(0, 255).astype("uint8")
        Image.fromarray(pixels, "L").save(target / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`surgery build quickstart`, one short epoch, built once per session: `runs/quickstart/latest`."""
    root = tmp_path_factory.mktemp("quickstart")
    done = surgery_cli(
        "build", "quickstart", "--runs", str(root / "runs"),
        "--set", "train.epochs=1", "--set", "data.limit_train=300", "--set", "export.formats=[safetensors]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "runs" / "quickstart" / "latest"

"""Shared test set-up: nothing waits on a network that isn't there."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
    """One local Ray instance shared by every test that needs Ray (starting one costs seconds)."""
    import ray

    ray.init(
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

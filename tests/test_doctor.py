"""`surgery doctor`: versions, devices, hubs (offline quickly), caches."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serve.ingress import doctor_lines
from surgery import doctor


def test_report_lists_versions_devices_hubs_and_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "blob").write_bytes(b"x" * 2**20)
    report = doctor.doctor_report(serving=doctor_lines())
    for name in ("python", "torch", "timm", "transformers", "ray", "cuda", "haproxy"):
        assert f"\n{name}" in report
    assert "cores usable; RAM" in report
    assert "surgery serve's ingress: haproxy" in report  # ray[serve] on Linux bundles it
    assert "offline (HF_HUB_OFFLINE=1)" in report
    assert f"cache huggingface {tmp_path / 'hub'} (0.0 GiB)" in report


def test_hub_probe_is_short_when_the_network_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(doctor, "HUBS", ("https://10.255.255.1", "https://192.0.2.1"))  # unroutable addresses
    started = time.perf_counter()
    lines = doctor.hub_lines(timeout=1.0)
    assert time.perf_counter() - started < 3.0
    assert any("unreachable" in line for line in lines)
    assert "offline" in lines[-1]

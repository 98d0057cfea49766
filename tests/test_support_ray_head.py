"""The Ray head fixture: private, on loopback, and gone without a trace when stopped."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from tests.support.engines_ray import RayHead


def _other_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (where a head bound to all interfaces would answer)."""
    psutil = pytest.importorskip("psutil")  # installed with ray[default]
    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family == socket.AF_INET and not a.address.startswith("127.")})


def test_the_head_answers_the_jobs_api_on_loopback_only(ray_head: RayHead) -> None:
    with urllib.request.urlopen(f"{ray_head.address}/api/version", timeout=10) as response:
        assert json.loads(response.read())["ray_version"]
    assert ray_head.address.startswith("http://127.0.0.1:")
    for address in _other_addresses():
        with socket.socket() as probe, pytest.raises(OSError):
            probe.settimeout(2)
            probe.connect((address, ray_head.dashboard_port))

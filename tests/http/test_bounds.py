"""The bounds of data_plane/http/bounds.py and their test/bench knob."""

from __future__ import annotations

import math

import pytest

from data_plane.http.bounds import Bounds, BoundsError, from_environment


def test_defaults_are_spec_11() -> None:
    b = from_environment({})
    assert (b.handshake_timeout, b.head_timeout, b.body_idle_timeout, b.response_idle_timeout,
            b.keepalive_idle_timeout) == (10, 10, 30, 30, 60)
    assert (b.max_connections, b.max_connections_per_ip, b.high_water) == (4096, 256, 64 * 1024)
    assert b.enforced and b.as_dict()["max_connections_per_ip"] == 256


def test_overrides_and_off() -> None:
    b = from_environment({"MTLSGATE_PROXY_BOUNDS": "head_timeout=0.5, max_connections_per_ip=3"})
    assert b.head_timeout == 0.5 and b.max_connections_per_ip == 3 and b.keepalive_idle_timeout == 60
    off = from_environment({"MTLSGATE_PROXY_BOUNDS": "off"})
    assert not off.enforced and math.isinf(off.max_connections) and off.high_water == Bounds().high_water
    assert off.as_dict()["head_timeout"] == "unlimited"


@pytest.mark.parametrize("text", ["nope=1", "head_timeout", "head_timeout=x", "max_headers=0"])
def test_bad_knob_is_one_clear_error(text: str) -> None:
    with pytest.raises(BoundsError, match="MTLSGATE_PROXY_BOUNDS"):
        from_environment({"MTLSGATE_PROXY_BOUNDS": text})

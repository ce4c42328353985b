"""SPEC §11 admission without sockets: per-IP limit, eviction of handshaking/idle connections oldest first."""

from __future__ import annotations

from data_plane.http.admission import HANDSHAKE, IDLE, Admission


def test_per_ip_limit_refuses_only_that_address() -> None:
    a: Admission[str] = Admission(max_connections=100, max_per_ip=2)
    for key in ("a1", "a2"):
        assert not a.admit("10.0.0.1").refuse
        a.opened(key, "10.0.0.1")
    assert a.admit("10.0.0.1").refuse == "per_ip_limit"
    assert not a.admit("10.0.0.2").refuse
    a.closed("a1")
    assert not a.admit("10.0.0.1").refuse
    a.closed("a1")  # twice is harmless
    assert a.connections_from("10.0.0.1") == 1


def test_at_the_cap_the_oldest_evictable_goes_first_and_busy_ones_never() -> None:
    a: Admission[str] = Admission(max_connections=3, max_per_ip=10)
    for key in ("c1", "c2", "c3"):
        a.opened(key, key)
    a.busy("c1")  # a request in progress
    a.idle("c2")  # handshake done, now idle: newer than c3's pending handshake
    decision = a.admit("new")
    assert (decision.evict, decision.evict_reason) == ("c3", HANDSHAKE)
    a.closed("c3")
    a.opened("c4", "new")
    a.busy("c4")
    assert (a.admit("x").evict, a.admit("x").evict_reason) == ("c2", IDLE)
    a.busy("c2")
    assert a.admit("x").refuse == "worker_full"
    a.idle("c1")
    assert a.admit("x").evict == "c1"
    assert len(a) == 3

"""Fixtures for the roll-out suites: the xDS suites' control plane, nodes and echo backend, plus the
four-node fleet in two label groups."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.rollouts.fleet import ADDRESSES, ZONES
from tests.xds.conftest import Node, api, control_plane, echo_backend, start_node  # noqa: F401


@pytest.fixture
def fleet(start_node: Callable[..., Node]) -> Iterator[dict[str, Node]]:  # noqa: F811
    # Reports every second: the maxRejectIncrease gate reads them during a bake of a few seconds.
    yield {node_id: start_node(node_id, f"zone-{zone}", {"zone": zone}, ADDRESSES[node_id],
                               extra=["--report-interval", "1"])
           for node_id, zone in ZONES.items()}

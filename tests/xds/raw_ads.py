"""A bare ADS client for protocol tests: one stream, DiscoveryRequests out, DiscoveryResponses in."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2


class RawAds:
    """A bare ADS stream: send DiscoveryRequests, receive DiscoveryResponses, with deadlines."""

    def __init__(self, channel: grpc.Channel, node_id: str, labels: dict[str, str]) -> None:
        self.node = base_pb2.Node(id=node_id, cluster="raw")
        self.node.metadata.CopyFrom(struct_pb2.Struct())
        self.node.metadata.update(labels)
        self._out: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self.responses: queue.Queue[object] = queue.Queue()
        self._first = True
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(self._requests())
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        while (item := self._out.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as exc:
            self.responses.put(exc)

    def send(self, type_url: str, *, version: str = "", nonce: str = "", names: tuple[str, ...] = (),
             error: str = "") -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce,
                                             resource_names=list(names))
        if self._first:
            req.node.CopyFrom(self.node)
            self._first = False
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._out.put(req)

    def recv(self, timeout: float = 10.0) -> discovery_pb2.DiscoveryResponse:
        item = self.responses.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        assert isinstance(item, discovery_pb2.DiscoveryResponse)
        return item

    def nothing_pending(self) -> bool:
        return self.responses.empty()

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()

"""Node admission (SPEC §8), pure: which xDS stream may speak for which node, and with which cluster and
labels. With authenticated xDS the certificate's identity must be the one registered as Node `nodes/<node.id>`
and the Node resource decides cluster and labels; what the node declares in `node.metadata` /
`node.cluster` is only compared (a mismatch is logged and shown in `status`). Under `--insecure` a stream
without a certificate declares its own labels unless a Node resource exists (the resource wins)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from mtlsgate.v1 import resources_pb2

from data_plane.validation.resources import FieldViolation

MAX_IDENTITY = 1024
MAX_FIELD = 256
MAX_LABELS = 64
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")


def validate_node(node: resources_pb2.Node) -> list[FieldViolation]:
    problems = []
    identity = node.identity
    if not identity:
        problems.append(FieldViolation("identity", "required: the SPIFFE ID (spiffe://…) or cn:NAME that the "
                                                   "node's xDS client certificate carries"))
    elif len(identity) > MAX_IDENTITY:
        problems.append(FieldViolation("identity", f"longer than {MAX_IDENTITY} characters"))
    elif not (identity.startswith("spiffe://") and len(identity) > len("spiffe://")) and not (
            identity.startswith("cn:") and len(identity) > 3):
        problems.append(FieldViolation("identity", f"{identity[:80]!r} is neither a spiffe:// URI nor cn:NAME"))
    elif any(c.isspace() or not c.isprintable() for c in identity):
        problems.append(FieldViolation("identity", "must not contain spaces or control characters"))
    if len(node.cluster) > MAX_FIELD:
        problems.append(FieldViolation("cluster", f"longer than {MAX_FIELD} characters"))
    if len(node.labels) > MAX_LABELS:
        problems.append(FieldViolation("labels", f"{len(node.labels)} labels; at most {MAX_LABELS}"))
    for key, value in sorted(node.labels.items()):
        if not _LABEL_KEY.fullmatch(key):
            problems.append(FieldViolation(f"labels.{key[:64]}", "label keys are letters, digits and ._/- "
                                                                  f"(at most {MAX_FIELD})"))
        elif len(value) > MAX_FIELD:
            problems.append(FieldViolation(f"labels.{key}", f"longer than {MAX_FIELD} characters"))
    return problems


class NodeRefused(Exception):
    """The stream may not speak for this node; the message names the identity and what is wrong."""


@dataclass(frozen=True)
class Admission:
    node_id: str
    cluster: str
    labels: Mapping[str, str]
    identity: str  # the authenticated identity ("" = none, only under --insecure)
    registered: bool  # a Node resource decided cluster and labels
    mismatch: str = ""  # what the node declared that the Node resource overrides
    declared: Mapping[str, str] = field(default_factory=dict)


def node_id_of(name: str) -> str:
    return name.partition("/")[2]


def registered_node(nodes: Mapping[str, resources_pb2.Node], node_id: str) -> resources_pb2.Node | None:
    return nodes.get(f"nodes/{node_id}")


def _mismatch(node: resources_pb2.Node, cluster: str, labels: Mapping[str, str]) -> str:
    parts = []
    if cluster and cluster != node.cluster:
        parts.append(f"cluster {cluster!r} (registered: {node.cluster!r})")
    differing = sorted(k for k in set(labels) | set(node.labels) if labels.get(k) != node.labels.get(k))
    if labels and differing:
        declared = ",".join(f"{k}={labels[k]}" for k in differing if k in labels) or "-"
        registered = ",".join(f"{k}={node.labels[k]}" for k in differing if k in node.labels) or "-"
        parts.append(f"labels {declared} (registered: {registered})")
    return "node declared " + "; ".join(parts) if parts else ""


def admit(node_id: str, cluster: str, labels: Mapping[str, str], certificate_identities: Collection[str],
          nodes: Mapping[str, resources_pb2.Node], *, insecure: bool) -> Admission:
    """Decide a stream's first request. `certificate_identities`: the peer certificate's `spiffe://` URI
    SANs and `cn:<CN>` (empty without a certificate). Raises NodeRefused."""
    node = registered_node(nodes, node_id)
    if not certificate_identities:
        if not insecure:
            raise NodeRefused("xDS requires a client certificate (the control plane runs without --insecure)")
        if node is None:
            return Admission(node_id, cluster, dict(labels), "", False, declared=dict(labels))
        return Admission(node_id, node.cluster, dict(node.labels), "", True, _mismatch(node, cluster, labels),
                         dict(labels))
    shown = ", ".join(sorted(certificate_identities))
    if node is None:
        owner = next((n for n in nodes.values() if n.identity in certificate_identities), None)
        if owner is not None:
            raise NodeRefused(f"{shown} is registered as node {node_id_of(owner.name)!r}, not {node_id!r}")
        raise NodeRefused(f"{shown} is not a registered node: no Node nodes/{node_id} (register it with "
                          f"`mtlsgate apply` of a Node whose identity is this certificate's)")
    if node.identity not in certificate_identities:
        raise NodeRefused(f"node {node_id!r} is registered to {node.identity}; this certificate is {shown}")
    return Admission(node_id, node.cluster, dict(node.labels), node.identity, True,
                     _mismatch(node, cluster, labels), dict(labels))

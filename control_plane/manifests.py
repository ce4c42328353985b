"""Resources as people write and read them: `apply` manifests (multi-document YAML with `kind:` and
`name:`), the raw YAML `gcloud … import --source` takes, and the YAML/JSON that `get -o` prints. Field
names are protobuf's JSON names (camelCase), which are GCP's. Pure: text in, messages out, and back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from control_plane.manifest_schema import FieldProblem, check_fields
from control_plane.resource_names import (
    KINDS,
    InvalidName,
    Kind,
    kind_for_message,
    normalise_name,
    parse_kind,
)

MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_DOCUMENTS = 1000
# Output-only fields a `gcloud … export` / `mtlsgate get -o yaml` file carries: tolerated and ignored on
# input (an `etag` from an old export must not become a surprise precondition).
OUTPUT_ONLY_FIELDS = ("createTime", "updateTime", "etag", "privateKeySha256", "crlSourceStatus")


class ManifestError(ValueError):
    """Bad input, located: `FILE (document N): field: problem`."""


@dataclass(frozen=True)
class ManifestResource:
    kind: Kind
    resource: Message  # name normalised
    source: str  # "FILE (document N) kind/id", how errors name it


def _load_documents(text: str, source: str) -> list[Any]:
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: {yaml_problem(exc)}") from None
    if len(documents) > MAX_DOCUMENTS:
        raise ManifestError(f"{source}: more than {MAX_DOCUMENTS} documents")
    return documents


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`line 3, column 7: not valid YAML (mapping values are not allowed here)`: where, then what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}not valid YAML ({problem})"


def label(kind: Kind, name: str) -> str:
    """How the CLI names one resource in its output and errors: `listener/public`."""
    return f"{kind.kind.lower()}/{name.partition('/')[2] or name}"


def _plain(value: Any) -> Any:
    """YAML turns unquoted timestamps into datetimes; protobuf's JSON parser wants strings."""
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _to_message(kind: Kind, fields: dict[str, Any], where: str) -> Message:
    message = kind.message()
    body = _plain({k: v for k, v in fields.items() if k not in OUTPUT_ONLY_FIELDS})
    try:
        check_fields(kind.message.DESCRIPTOR, body)
        json_format.ParseDict(body, message)
    except FieldProblem as exc:
        raise ManifestError(f"{where}: {exc}") from None
    except json_format.ParseError as exc:  # something the schema check lets through; still one line
        detail = " ".join(str(exc).split()).replace(f'Message type "{kind.message.DESCRIPTOR.full_name}"',
                                                    kind.kind)
        raise ManifestError(f"{where}: {detail.rstrip('.')}") from None
    return message


def parse_manifest(text: str, source: str) -> list[ManifestResource]:
    """Every document of an `apply` file. Each must have `kind:` and `name:`."""
    out = []
    for index, document in enumerate(_load_documents(text, source), 1):
        where = f"{source} (document {index})"
        if not isinstance(document, dict):
            raise ManifestError(f"{where}: expected a mapping with kind: and name:")
        fields = dict(document)
        kind_text = fields.pop("kind", None)
        name = fields.pop("name", None)
        allowed = ", ".join(k.kind for k in KINDS)
        if not isinstance(kind_text, str):
            raise ManifestError(f"{where}: kind: required; allowed: {allowed}")
        try:
            kind = parse_kind(kind_text)
        except InvalidName:
            raise ManifestError(f"{where}: kind: {kind_text} is not a manifest kind; allowed: {allowed}") from None
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}: name: required (the {kind.kind}'s ID, e.g. name: demo)")
        fields.pop("apiVersion", None)  # tolerated, kubectl habit
        try:
            normalised = normalise_name(name, kind)
        except InvalidName as exc:
            raise ManifestError(f"{where}: name: {exc}") from None
        where = f"{where} {label(kind, normalised)}"
        message = _to_message(kind, fields, where)
        message.name = normalised  # type: ignore[attr-defined]
        out.append(ManifestResource(kind, message, where))
    return out


def parse_gcp_import(text: str, kind: Kind, name: str, source: str) -> Message:
    """The YAML `gcloud certificate-manager trust-configs import` / `gcloud network-security
    server-tls-policies import` take: one resource, no `kind:`; a `name:` (GCP's full name, from an
    export) is ignored in favour of NAME, like gcloud does."""
    documents = _load_documents(text, source)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ManifestError(f"{source}: expected one YAML mapping (the {kind.kind} fields)")
    fields = dict(documents[0])
    fields.pop("name", None)
    if "kind" in fields:
        raise ManifestError(f"{source}: has kind: — this looks like an apply manifest (use mtlsgate apply -f)")
    try:
        normalised = normalise_name(name, kind)
    except InvalidName as exc:
        raise ManifestError(str(exc)) from None
    message = _to_message(kind, fields, f"{source} {label(kind, normalised)}")
    message.name = normalised  # type: ignore[attr-defined]
    return message


def parse_resource_file(text: str, kind: Kind, source: str) -> Message:
    """One resource for `mtlsgate check` offline: gcloud import YAML, or one `apply` document (its
    `kind:` must then be `kind`); `name:` is optional and only used in messages."""
    documents = _load_documents(text, source)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        found = f"{len(documents)} documents" if len(documents) != 1 else "no mapping"
        raise ManifestError(f"{source}: expected one YAML mapping of {kind.kind} fields ({found})")
    fields = dict(documents[0])
    fields.pop("apiVersion", None)
    kind_text = fields.pop("kind", None)
    if kind_text is not None:
        try:
            found_kind = parse_kind(str(kind_text))
        except InvalidName:
            found_kind = None
        if found_kind is not kind:
            raise ManifestError(f"{source}: kind: {kind_text} where a {kind.kind} was expected")
    name = fields.pop("name", None)
    where = f"{source} {label(kind, str(name))}" if isinstance(name, str) and name else source
    return _to_message(kind, fields, where)


def order_for_apply(resources: Iterable[ManifestResource]) -> list[ManifestResource]:
    """Referenced kinds first (TrustConfig, Certificate, ServerTlsPolicy, Listener), file order within."""
    rank = {k.kind: i for i, k in enumerate(KINDS)}
    return sorted(resources, key=lambda r: rank[r.kind.kind])


# ---------------------------------------------------------------- output


def to_document(message: Message) -> dict[str, Any]:
    """`kind:` first, then every set field by its YAML name (`name: trustConfigs/demo`, …)."""
    body = json_format.MessageToDict(message, preserving_proto_field_name=False)
    return {"kind": kind_for_message(message).kind, **body}


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:  # PEM blocks as literal blocks, readable and byte-exact
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         explicit_start=len(documents) > 1, width=10_000)

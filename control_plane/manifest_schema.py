"""A YAML document checked against a resource message's schema before protobuf's JSON parser sees it, so
a typo'd field, a wrong enum value or a list where a string belongs is reported in our words
(`mtlsPolicy.clientValidationMode: REJECT_EVERYTHING is not a valid value; allowed: …`) with a "did you
mean" from the fields a user may write — never protobuf's internals. Pure: descriptors and dicts only."""

from __future__ import annotations

import difflib
import re
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

# Fields of the stored resources a manifest cannot set: the server fills them in (`name:` is handled by
# the manifest reader itself; the output-only ones an export carries are dropped before this check).
NOT_WRITABLE = frozenset({"name", "etag", "createTime", "updateTime", "privateKeySha256",
                          "resolvedServerTlsPolicy", "resolvedBackendAuthentication"})
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_DURATION_TEXT = re.compile(r"-?\d+(\.\d{1,9})?s")  # protobuf's JSON form: `300s`, `1.5s`
_INTEGER_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
                  FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
                  FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
                  FieldDescriptor.TYPE_SFIXED64}
_INT32_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}


class FieldProblem(ValueError):
    """One field of a document is wrong: `field` is its YAML path, `text` says what is wrong."""

    def __init__(self, field: str, text: str) -> None:
        super().__init__(f"{field}: {text}" if field else text)
        self.field = field
        self.text = text


def writable_fields(descriptor: Descriptor, *, top_level: bool) -> list[str]:
    names = [f.json_name for f in descriptor.fields]
    return [n for n in names if n not in NOT_WRITABLE] if top_level else names


def enum_values(enum: EnumDescriptor) -> list[str]:
    """The values worth offering: `…_UNSPECIFIED` means "not set", which omitting the field says better."""
    return [v.name for v in enum.values if not v.name.endswith("_UNSPECIFIED")]


def check_fields(descriptor: Descriptor, document: dict[Any, Any], path: str = "") -> None:
    """Raise FieldProblem for the first field of `document` that `descriptor` cannot take."""
    top_level = not path
    by_name = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    oneofs_seen: dict[str, str] = {}
    for key, value in document.items():
        where = f"{path}.{key}" if path else str(key)
        field = by_name.get(key) if isinstance(key, str) else None
        if field is None or (top_level and field.json_name in NOT_WRITABLE):
            raise FieldProblem(where, _unknown(str(key), descriptor, top_level))
        oneof = field.containing_oneof
        if oneof is not None and value is not None:
            if oneof.name in oneofs_seen:
                raise FieldProblem(where, f"cannot be set together with {oneofs_seen[oneof.name]}; "
                                   "give one per entry")
            oneofs_seen[oneof.name] = field.json_name
        if value is None:  # `field:` with nothing after it: the same as leaving it out
            continue
        _check_value(field, value, f"{path}.{field.json_name}" if path else field.json_name)


def _unknown(key: str, descriptor: Descriptor, top_level: bool) -> str:
    candidates = writable_fields(descriptor, top_level=top_level)
    if top_level and key in NOT_WRITABLE:
        return "set by the control plane; a manifest cannot write it"
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # snake_case or odd capitals of a real field
        folded = {c.lower(): c for c in candidates}
        match = folded.get(key.replace("_", "").replace("-", "").lower())
        close = [match] if match else []
    if close:
        return f"unknown field; did you mean {close[0]}?"
    return f"unknown field; allowed: {', '.join(candidates)}"


def _check_value(field: FieldDescriptor, value: Any, where: str) -> None:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        if not isinstance(value, dict):
            raise FieldProblem(where, f"expected a mapping (key: value), got {_describe(value)}")
        value_field = message.fields_by_name["value"]
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise FieldProblem(where, f"key {key!r} must be a string")
            _check_single(value_field, item, f"{where}[{key!r}]")
        return
    if field.is_repeated:
        if not isinstance(value, list):
            raise FieldProblem(where, f"expected a list, got {_describe(value)}")
        for index, item in enumerate(value):
            _check_single(field, item, f"{where}[{index}]")
        return
    _check_single(field, value, where)


def _check_single(field: FieldDescriptor, value: Any, where: str) -> None:
    message = field.message_type
    if message is not None:
        if message.full_name == _TIMESTAMP:
            if not isinstance(value, str):
                raise FieldProblem(where, f"expected an RFC 3339 time such as 2030-01-01T00:00:00Z, "
                                   f"got {_describe(value)}")
            return
        if message.full_name == _DURATION:
            if not isinstance(value, str) or not _DURATION_TEXT.fullmatch(value):
                raise FieldProblem(where, f"expected a duration in seconds such as 300s, got {_describe(value)}")
            return
        if not isinstance(value, dict):
            fields = ", ".join(f.json_name for f in message.fields)
            raise FieldProblem(where, f"expected a mapping with fields {fields}, got {_describe(value)}")
        check_fields(message, value, where)
        return
    if field.type == FieldDescriptor.TYPE_ENUM:
        allowed = enum_values(field.enum_type)
        names = {v.name for v in field.enum_type.values}
        if not isinstance(value, str) or value not in names:
            shown = value if isinstance(value, str | int | float | bool) else _describe(value)
            raise FieldProblem(where, f"{shown} is not a valid value; allowed: {', '.join(allowed)}")
        return
    if field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise FieldProblem(where, f"expected a string, got {_describe(value)} (quote it)")
        return
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise FieldProblem(where, f"expected true or false, got {_describe(value)}")
        return
    if field.type in _INTEGER_TYPES:
        number = value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            number = int(value)
        if not isinstance(number, int) or isinstance(number, bool):
            raise FieldProblem(where, f"expected a whole number, got {_describe(value)}")
        if field.type in _INT32_TYPES and not -(2**31) <= number < 2**31:
            raise FieldProblem(where, f"{number} is out of range")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__

"""The `--authz FILE` role bindings: `bindings: [{identity: EXACT | PREFIX*, role: admin|editor|viewer|node}]`.
An exact identity wins over globs; among globs the longest prefix wins."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import yaml

MAX_BINDINGS_BYTES = 1024 * 1024
MAX_BINDINGS = 10_000
MAX_IDENTITY = 1024


class Role(StrEnum):
    ADMIN = "admin"
    EDITOR = "editor"
    VIEWER = "viewer"
    NODE = "node"


class BindingsError(ValueError):
    """A bindings file that cannot be used; the message names the entry and the problem."""


@dataclass(frozen=True)
class Binding:
    identity: str
    role: Role

    @property
    def is_glob(self) -> bool:
        return self.identity.endswith("*")

    def matches(self, identity: str) -> bool:
        if self.is_glob:
            return identity.startswith(self.identity[:-1])
        return identity == self.identity


@dataclass(frozen=True)
class Bindings:
    entries: tuple[Binding, ...]

    def role_for(self, identity: str) -> Role | None:
        for binding in self.entries:
            if not binding.is_glob and binding.identity == identity:
                return binding.role
        globs = [b for b in self.entries if b.is_glob and b.matches(identity)]
        if not globs:
            return None
        return max(globs, key=lambda b: len(b.identity)).role


def parse_bindings(text: str, source: str = "bindings") -> Bindings:
    if len(text.encode()) > MAX_BINDINGS_BYTES:
        raise BindingsError(f"{source}: larger than {MAX_BINDINGS_BYTES} bytes")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise BindingsError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("bindings"), list):
        raise BindingsError(f"{source}: expected a mapping with a `bindings:` list")
    unknown = sorted(set(document) - {"bindings"})
    if unknown:
        raise BindingsError(f"{source}: unknown field {unknown[0]!r} (expected `bindings`)")
    items = document["bindings"]
    if len(items) > MAX_BINDINGS:
        raise BindingsError(f"{source}: {len(items)} bindings; at most {MAX_BINDINGS}")
    entries: list[Binding] = []
    seen: dict[str, int] = {}
    roles = ", ".join(r.value for r in Role)
    for index, item in enumerate(items):
        where = f"{source}: bindings[{index}]"
        if not isinstance(item, dict) or set(item) != {"identity", "role"}:
            raise BindingsError(f"{where}: expected exactly `identity` and `role`")
        identity, role = item["identity"], item["role"]
        if not isinstance(identity, str) or not identity or len(identity) > MAX_IDENTITY:
            raise BindingsError(f"{where}.identity: a non-empty string of at most {MAX_IDENTITY} characters")
        if "*" in identity[:-1]:
            raise BindingsError(f"{where}.identity: {identity!r}: `*` is only allowed at the end")
        try:
            parsed_role = Role(role)
        except ValueError:
            raise BindingsError(f"{where}.role: {role!r} is not a role ({roles})") from None
        if identity in seen:
            raise BindingsError(f"{where}.identity: {identity!r} is already bound in bindings[{seen[identity]}]")
        seen[identity] = index
        entries.append(Binding(identity, parsed_role))
    return Bindings(tuple(entries))

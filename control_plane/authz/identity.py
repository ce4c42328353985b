"""Naming a caller from what its transport proved: the mTLS client certificate's SPIFFE ID (else
`cn:<CommonName>`), or the identity a bearer token maps to; `peer:ADDRESS` for an unauthenticated caller
(only possible under `--insecure`)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Identity:
    name: str  # "spiffe://…", "cn:NAME", a token's identity, or "peer:ADDRESS"
    via: str  # "certificate" | "token" | "none"

    @property
    def authenticated(self) -> bool:
        return self.via != "none"


class Unauthenticated(Exception):
    """The caller offered a credential that does not verify (a wrong token): never fall back to another."""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def certificate_identity(auth_context: Mapping[str, Iterable[Any]]) -> str | None:
    """The verified client certificate's SPIFFE URI SAN, else `cn:<CN>`; None without a certificate."""
    for san in auth_context.get("x509_subject_alternative_name", ()):
        text = _text(san)
        if text.startswith("spiffe://"):
            return text
    for cn in auth_context.get("x509_common_name", ()):
        return "cn:" + _text(cn)
    return None


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


def token_identity(offered: str, tokens: Mapping[str, str]) -> str | None:
    """The identity of `offered` among `tokens` (token → identity), compared in constant time."""
    found = None
    for token, identity in tokens.items():
        if hmac.compare_digest(offered.encode(), token.encode()):
            found = identity
    return found


def anonymous_token_identity(token: str) -> str:
    return f"token:{hashlib.sha256(token.encode()).hexdigest()[:12]}"


def peer_host(peer: str) -> str:
    """ "ipv4:127.0.0.1:53412" → "127.0.0.1": the ephemeral port identifies nobody."""
    family, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] if family in ("ipv4", "ipv6") else peer
    return host.strip("[]")


def who(auth_context: Mapping[str, Iterable[Any]], metadata: Iterable[tuple[str, Any]] | None, peer: str,
        tokens: Mapping[str, str] | None) -> Identity:
    """The caller. A bearer token, when offered and tokens are configured, decides (a wrong one raises
    Unauthenticated); else the client certificate; else an unauthenticated `peer:` identity."""
    offered = bearer_token(metadata)
    if offered is not None and tokens is not None:
        identity = token_identity(offered, tokens)
        if identity is None:
            raise Unauthenticated("invalid bearer token")
        return Identity(identity, "token")
    from_certificate = certificate_identity(auth_context)
    if from_certificate is not None:
        return Identity(from_certificate, "certificate")
    host = peer_host(peer)
    return Identity(f"peer:{host}" if host else "unknown", "none")

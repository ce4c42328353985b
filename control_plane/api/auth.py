"""The `--token-file` (SPEC §8): bearer tokens and the identity each stands for. Checking them on every
call is `control_plane/api/authorization.py`'s job; mTLS itself is the server credentials' job."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.authz.identity import anonymous_token_identity, bearer_token, token_identity

MAX_TOKENS = 1000


class TokenFileError(ValueError):
    pass


@dataclass(frozen=True)
class Tokens:
    """Accepted bearer tokens → the identity recorded in the audit log."""

    identities: Mapping[str, str]

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        """One token per line, optionally followed by whitespace and an identity (`s3cr3t alice`); blank
        lines and `#` comments ignored. Without an identity the audit log shows `token:<sha256 prefix>`."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from exc
        identities: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            token, _, identity = line.partition(" ")
            if len(token) < 16:
                raise TokenFileError(f"{path}:{number}: token too short (at least 16 characters)")
            identities[token] = identity.strip() or anonymous_token_identity(token)
        if not identities:
            raise TokenFileError(f"{path}: no token in the file")
        if len(identities) > MAX_TOKENS:
            raise TokenFileError(f"{path}: too many tokens (limit {MAX_TOKENS})")
        return cls(identities)

    def identity(self, metadata: Any) -> str | None:
        """The identity for the request's `authorization: Bearer TOKEN`, or None."""
        offered = bearer_token(metadata)
        return token_identity(offered, self.identities) if offered is not None else None

"""Bearer keys: parsing, hashing, and the RFC 6750 challenge. Pure."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# A key: its fixed lower-case prefix, its kind (group 1), then one character of its secret; a quantifier
# after it says how many (redaction.py finds keys in free text with the same pattern).
KEY_PATTERN = r"mcpm_(live|test|oauth)_[A-Za-z0-9]"
# The scheme is case-insensitive (RFC 9110 §11.1), the token is not.
_BEARER = re.compile(rf"^(?i:Bearer) +({KEY_PATTERN}{{1,200}})$")


@dataclass(frozen=True, slots=True)
class Credential:
    token: str
    kind: str  # 'live' | 'test' | 'oauth'

    @property
    def hash(self) -> str:
        return token_hash(self.token)

    @property
    def prefix(self) -> str:
        """What may be shown or logged of a key: its first characters, never the secret."""
        start = len("mcpm_") + len(self.kind) + 1
        return self.token[: start + min(4, (len(self.token) - start) // 2)] + "…"


def parse_authorization(header: str | None) -> Credential | None:
    """The credential in an Authorization header, or None if it is missing or malformed."""
    if not header:
        return None
    m = _BEARER.match(header.strip())
    if m is None:
        return None
    return Credential(token=m.group(1), kind=m.group(2))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def challenge(resource_metadata_url: str, error: str | None = None) -> str:
    """WWW-Authenticate value: no error code when no credential was sent (RFC 6750 §3.1)."""
    parts = ['Bearer realm="mcpmeter"']
    if error:
        parts.append(f'error="{error}"')
    parts.append(f'resource_metadata="{resource_metadata_url}"')
    return ", ".join(parts)

"""addon.auth (bearer parsing, hashing, the RFC 6750 challenge) and addon.clients (who called)."""

from __future__ import annotations

import hashlib
import re

import pytest

from addon.auth import Credential, challenge, parse_authorization, token_hash
from addon.clients import classify


# --- parse_authorization -----------------------------------------------------------------------

@pytest.mark.parametrize("header, token, kind", [
    ("Bearer mcpm_live_abc123", "mcpm_live_abc123", "live"),
    ("Bearer mcpm_test_XYZ789", "mcpm_test_XYZ789", "test"),
    ("Bearer mcpm_oauth_Tok3n", "mcpm_oauth_Tok3n", "oauth"),
    ("bearer mcpm_live_abc", "mcpm_live_abc", "live"),  # the scheme is case-insensitive
    ("BEARER mcpm_live_abc", "mcpm_live_abc", "live"),
    ("BeArEr mcpm_test_abc", "mcpm_test_abc", "test"),
    ("Bearer   mcpm_live_abc", "mcpm_live_abc", "live"),
    ("  Bearer mcpm_live_abc  ", "mcpm_live_abc", "live"),  # surrounding whitespace is not the token's
    ("Bearer mcpm_live_" + "a" * 200, "mcpm_live_" + "a" * 200, "live"),
    ("Bearer mcpm_live_aBc", "mcpm_live_aBc", "live"),  # the secret keeps its case
])
def test_accepts_well_formed_keys(header: str, token: str, kind: str) -> None:
    assert parse_authorization(header) == Credential(token=token, kind=kind)


@pytest.mark.parametrize("header", [
    None, "", " ", "Bearer", "Bearer ", "Bearer mcpm_live_",
    "Basic bWNwbV9saXZlX2FiYw==", "Token mcpm_live_abc", "Bearer: mcpm_live_abc", "Bearermcpm_live_abc",
    "mcpm_live_abc",  # no scheme
    "Bearer sk_live_abc", "Bearer mcpm_prod_abc", "Bearer mcpm_abc", "Bearer mcpm__abc", "Bearer live_abc",
    "Bearer MCPM_LIVE_abc", "Bearer Mcpm_live_abc",  # the prefix is lower-case
    "Bearer mcpm_LIVE_abc", "Bearer mcpm_Test_abc", "Bearer mcpm_OAUTH_abc",
    "Bearer mcpm_live_abc-def", "Bearer mcpm_live_abc_def", "Bearer mcpm_live_abc.def", "Bearer mcpm_live_abc def",
    "Bearer mcpm_live_abc=", "Bearer mcpm_live_ab/c", "Bearer mcpm_live_abç", "Bearer mcpm_live_abc\x00",
    "Bearer mcpm_live_abc\nBearer mcpm_live_def", "Bearer mcpm_live_abc, Bearer mcpm_live_def",
    "Bearer\tmcpm_live_abc",
    "Bearer mcpm_live_" + "a" * 201,
])
def test_rejects_anything_else(header: str | None) -> None:
    assert parse_authorization(header) is None


def test_kind_is_always_one_of_the_three() -> None:
    for kind in ("live", "test", "oauth"):
        for scheme in ("Bearer", "bearer", "BEARER"):
            cred = parse_authorization(f"{scheme} mcpm_{kind}_Secret1")
            assert cred is not None and cred.kind == kind


# --- hashing and the displayable prefix --------------------------------------------------------

@pytest.mark.parametrize("token", ["mcpm_live_abc", "mcpm_test_0123456789abcdef", "mcpm_oauth_Z"])
def test_token_hash_is_sha256_hex_of_the_token(token: str) -> None:
    expected = hashlib.sha256(token.encode()).hexdigest()
    assert token_hash(token) == expected
    assert re.fullmatch(r"[0-9a-f]{64}", expected)
    cred = parse_authorization(f"Bearer {token}")
    assert cred is not None and cred.hash == expected


def test_token_hash_known_values() -> None:
    assert token_hash("a") == "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
    assert token_hash("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_token_hash_is_case_sensitive() -> None:
    assert token_hash("mcpm_live_abc") != token_hash("mcpm_live_ABC")


@pytest.mark.parametrize("token, prefix", [
    ("mcpm_live_abcdefghijklmnop", "mcpm_live_abcd…"),
    ("mcpm_test_0123456789", "mcpm_test_0123…"),
    ("mcpm_oauth_ZYXWVUTSRQ", "mcpm_oauth_ZYXW…"),
])
def test_prefix_shows_the_kind_and_four_characters(token: str, prefix: str) -> None:
    cred = parse_authorization(f"Bearer {token}")
    assert cred is not None and cred.prefix == prefix


@pytest.mark.parametrize("secret_len", range(1, 41))
@pytest.mark.parametrize("kind", ["live", "test", "oauth"])
def test_prefix_never_contains_the_whole_secret(kind: str, secret_len: int) -> None:
    secret = "".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefgh"[i] for i in range(secret_len))
    token = f"mcpm_{kind}_{secret}"
    cred = parse_authorization(f"Bearer {token}")
    assert cred is not None
    shown = cred.prefix.removesuffix("…")
    assert cred.prefix.endswith("…")
    assert shown.startswith(f"mcpm_{kind}_")
    assert len(shown) - len(f"mcpm_{kind}_") <= 4
    assert secret not in cred.prefix and token not in cred.prefix


# --- the WWW-Authenticate challenge ------------------------------------------------------------

META_URL = "https://gw.example/.well-known/oauth-protected-resource"


def test_challenge_without_error_when_no_credential_was_sent() -> None:
    assert challenge(META_URL) == f'Bearer realm="mcpmeter", resource_metadata="{META_URL}"'


def test_challenge_with_error() -> None:
    assert challenge(META_URL, "invalid_token") == (
        f'Bearer realm="mcpmeter", error="invalid_token", resource_metadata="{META_URL}"'
    )


@pytest.mark.parametrize("error", [None, "invalid_token", "insufficient_scope"])
def test_challenge_is_an_rfc6750_auth_param_list(error: str | None) -> None:
    value = challenge(META_URL, error)
    scheme, _, params = value.partition(" ")
    assert scheme == "Bearer"
    pairs = dict(re.findall(r'([a-z_]+)="([^"]*)"', params))
    assert re.fullmatch(r'[a-z_]+="[^"]*"(, [a-z_]+="[^"]*")*', params)
    assert pairs["resource_metadata"] == META_URL
    assert pairs.get("error") == error
    assert ("error=" in value) is (error is not None)


def test_challenge_empty_error_is_no_error() -> None:
    assert "error" not in challenge(META_URL, "")


# --- clients.classify --------------------------------------------------------------------------

@pytest.mark.parametrize("user_agent, client", [
    (None, "unknown"),
    ("", "unknown"),
    ("claude-code/1.0.43 (external, cli)", "claude-code"),
    ("Claude-User", "claude-desktop"),
    ("Claude/0.9.3 (Macintosh)", "claude-desktop"),
    ("Cursor/1.2.4 (darwin arm64)", "cursor"),
    ("Mozilla/5.0 Windsurf/1.9", "windsurf"),
    ("Codeium/1.0", "windsurf"),
    ("Visual Studio Code/1.101.0", "vscode"),
    ("vscode-mcp/1.0", "vscode"),
    ("mcp-inspector/0.14", "mcp-inspector"),
    ("openai-mcp/1.0.0", "openai"),
    ("python-httpx/0.28.1", "python-sdk"),
    ("Python/3.12 aiohttp/3.9.5", "python-sdk"),
    ("python-requests/2.32", "python-sdk"),
    ("node", "typescript-sdk"),
    ("node-fetch/1.0", "typescript-sdk"),
    ("undici", "typescript-sdk"),
    ("axios/1.7.2", "typescript-sdk"),
    ("curl/8.5.0", "curl"),
    ("my-curl/1.0", "other"),  # curl only at the start
    ("Go-http-client/1.1", "other"),
    ("Mozilla/5.0 (X11; Linux x86_64)", "other"),
])
def test_classify(user_agent: str | None, client: str) -> None:
    assert classify(user_agent) == client


def test_classify_prefers_the_product_over_its_library() -> None:
    assert classify("Cursor/1.0 node/20 undici") == "cursor"
    assert classify("claude-code/1.0 node") == "claude-code"
    assert classify("MCP Inspector (node)") == "mcp-inspector"

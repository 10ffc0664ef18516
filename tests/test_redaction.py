"""redaction.redact_credentials, which runs on every request: one pass over the raw header fields.

Checked against the by-name definition it replaces (each credential header set to its redacted
value with mitmproxy's own Headers methods) on any header block: names in any case, repeated,
values already redacted or not, bytes that are not UTF-8.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from mitmproxy.http import Headers

from addon.redaction import CREDENTIAL_HEADERS, REDACTED, drop_echoed_secrets, redact_credentials


def by_name(headers: Headers, key_prefix: str | None) -> None:
    for name in CREDENTIAL_HEADERS:
        if name in headers and not all(v.endswith(REDACTED) for v in headers.get_all(name)):
            headers[name] = f"Bearer {key_prefix} {REDACTED}" if name == "authorization" and key_prefix else REDACTED


names = st.sampled_from([b"Authorization", b"authorization", b"AUTHORIZATION", b"Cookie", b"cookie",
                         b"Proxy-Authorization", b"X-Forward-Authorization", b"Host", b"Accept", b"x"])
values = st.one_of(st.binary(max_size=24), st.sampled_from([b"(redacted)", b"Bearer k (redacted)", b"\xff(redacted)"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(names, values), max_size=8), st.one_of(st.none(), st.sampled_from(["mcpm_live_ab", "é"])))
def test_one_pass_redaction_is_the_by_name_redaction(fields: list[tuple[bytes, bytes]], prefix: str | None) -> None:
    fast, slow = Headers(fields), Headers(fields)
    redact_credentials(fast, prefix)
    by_name(slow, prefix)
    assert fast.fields == slow.fields
    assert all(value.endswith(REDACTED.encode()) for name, value in fast.fields
               if name.lower().decode() in CREDENTIAL_HEADERS)


def test_a_bearer_key_keeps_its_prefix_and_nothing_else() -> None:
    headers = Headers([(b"Authorization", b"Bearer mcpm_live_secret"), (b"Cookie", b"s=1"), (b"cookie", b"t=2")])
    redact_credentials(headers, "mcpm_live_se")
    assert headers.fields == ((b"Authorization", b"Bearer mcpm_live_se (redacted)"), (b"Cookie", b"(redacted)"))


def test_a_header_echoing_a_publisher_secret_is_dropped() -> None:
    headers = Headers([(b"X-Echo", b"X-Api-Key: long-secret-1"), (b"Content-Type", b"application/json"),
                       (b"x-echo", b"other"), (b"X-Short", b"short"), (b"Set-Cookie", b"a=long-secret-1")])
    assert drop_echoed_secrets(headers, ["long-secret-1", "short"]) == ["X-Echo", "Set-Cookie"]
    # only the fields holding it go; a value shorter than 8 characters is not looked for
    assert headers.fields == ((b"Content-Type", b"application/json"), (b"x-echo", b"other"), (b"X-Short", b"short"))
    assert drop_echoed_secrets(headers, ["short", ""]) == []

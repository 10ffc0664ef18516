"""Confinement (issue 7, class 1): what a client path may be, and the upstream URL it becomes."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given, settings, strategies as st

from addon import forwarding, legacy_sse, origins, paths
from addon.paths import InvalidPath

STREAMABLE = "http://127.0.0.1:4111/mcp"
SSE = "http://127.0.0.1:4112/legacy/sse"
LISTINGS = [(STREAMABLE, "streamable"), (SSE, "sse"), ("https://u.example:8443/a/b/", "http"),
            ("http://u.example", "streamable"), ("http://u.example/sse", "sse")]

HOSTILE_SUBPATHS = [
    # scheme / authority
    "http://127.0.0.1:4113/x", "https://evil.example/", "http:127.0.0.1/x", "HTTP:evil", "javascript:x",
    "/host/x", "//host/x", "///host/x", "/", "//",
    # dot segments, raw and encoded in every case and mix
    ".", "..", "../x", "x/..", "x/../y", "a/./b", "./x", "x/.",
    "%2e", "%2E", "%2e%2e", "%2E%2E", "%2e%2E", ".%2e", "%2e.", ".%2E/x", "x/%2e%2e/y", "x/%2e%2e",
    "..;/x", "..;jsessionid=1/x", ".;x", "%2e%2e;/x",
    # encoded slashes and backslashes
    "..%2f", "..%2F", "%2f", "x%2fy", "x%2F..%2Fy", "%5c", "x%5Cy", "..%5c..%5cetc",
    # raw backslash
    "\\", "x\\y", "..\\x", "\\\\host\\x",
    # empty segments
    "x//y", "x///", "a/b//c",
    # NUL, control characters, space, DEL, raw bytes >= 0x7f, unicode
    "x%00", "x%00y", "%0a", "%0d%0aHost:%20evil", "%7f", "%1f", "x\x00y", "x\ty", "x\ny", "x\ry",
    "x y", " ", "x\x7f", "x\x80", "caf\u00e9", "\u2025", "\uff0e\uff0e/x", "x\udcff", "\u202e",
    # malformed percent escapes
    "%zz", "%4", "%", "x%", "x%g0", "%%41", "%4/x",
    # fragments
    "x#y", "#", "x/#/../..",
]

ACCEPTED = [
    ("messages/", "messages/"), ("a/b/c", "a/b/c"), ("x@evil.example", "x@evil.example"),
    ("x;y", "x;y"), ("%41%2b", "%41%2b"), ("~user", "~user"), ("a.b/..c/c..", "a.b/..c/c.."),
    ("...", "..."), ("%2e%2e%2e", "%2e%2e%2e"), ("a%3fb", "a%3fb"), ("a%23b", "a%23b"), ("@evil", "@evil"),
    ("a/x:y", "a/x:y"), ("1:2", "1:2"), ("sub/", "sub/"),
]


@pytest.mark.parametrize("subpath", HOSTILE_SUBPATHS)
@pytest.mark.parametrize("upstream, transport", LISTINGS)
def test_hostile_subpaths_are_refused_on_every_transport(subpath: str, upstream: str, transport: str) -> None:
    with pytest.raises(InvalidPath):
        paths.check_subpath(subpath)
    build = legacy_sse.target_url if transport == "sse" else forwarding.target_url
    with pytest.raises(InvalidPath):
        build(upstream, subpath, "")


@pytest.mark.parametrize("subpath, sent", ACCEPTED)
def test_other_subpaths_are_forwarded_exactly_as_sent(subpath: str, sent: str) -> None:
    assert forwarding.target_url(STREAMABLE, subpath, "") == f"{STREAMABLE}/{sent}"
    assert legacy_sse.target_url(SSE, subpath, "") == f"http://127.0.0.1:4112/legacy/{sent}"


@pytest.mark.parametrize("query", ["a b", "x=\x00", "x=\r\nHost: evil", "x=\t", "x=\x7f", "x=\u00e9", "a#b", "#"])
def test_queries_with_raw_control_characters_space_or_fragment_are_refused(query: str) -> None:
    with pytest.raises(InvalidPath):
        forwarding.target_url(STREAMABLE, "", query)
    with pytest.raises(InvalidPath):
        legacy_sse.target_url(SSE, "messages/", query)


@pytest.mark.parametrize("query", ["x=1", "session_id=abc&x=%20", "a=%zz", "?", "a=..%2f..", "u=http://evil/"])
def test_queries_are_forwarded_as_sent(query: str) -> None:
    assert forwarding.target_url(STREAMABLE, "s", query) == f"{STREAMABLE}/s?{query}"
    assert legacy_sse.target_url(SSE, "messages/", query) == f"http://127.0.0.1:4112/legacy/messages/?{query}"


@pytest.mark.parametrize("upstream, subpath, query, url", [
    ("http://h/sse", "messages/", "", "http://h/messages/"),
    ("http://h/sse", "", "", "http://h/sse"),
    ("http://h/a/sse", "messages", "session_id=1", "http://h/a/messages?session_id=1"),
    ("http://h/sse?key=k", "", "x=1", "http://h/sse?key=k&x=1"),
    ("http://h/sse?key=k", "messages/", "x=1", "http://h/messages/?x=1"),
    ("http://h", "messages/", "", "http://h/messages/"),
])
def test_sse_listings_resolve_against_their_directory(upstream: str, subpath: str, query: str, url: str) -> None:
    assert legacy_sse.target_url(upstream, subpath, query) == url


def test_a_listing_url_with_a_query_keeps_it_in_front_of_the_clients() -> None:
    assert forwarding.target_url("http://h/mcp?key=k", "sub", "x=1") == "http://h/mcp/sub?key=k&x=1"
    assert forwarding.target_url("http://h/mcp/?key=k", "", "") == "http://h/mcp?key=k"


def test_the_built_url_is_verified_to_stay_under_the_base() -> None:
    base = paths.base_of(STREAMABLE, "streamable")
    paths.verify(f"{STREAMABLE}/x", base)
    paths.verify(STREAMABLE, base)
    for url in ("http://127.0.0.1:4113/mcp/x", "https://127.0.0.1:4111/mcp/x", "http://127.0.0.1:4111/mcpx",
                "http://127.0.0.1:4111/other", f"{STREAMABLE}/%2e%2e/x", f"{STREAMABLE}/a/../../x",
                f"{STREAMABLE}/x#y", "http://u@127.0.0.1:4111/mcp/x"):
        with pytest.raises(InvalidPath):
            paths.verify(url, base)


# --- property: whatever the subpath and query, refused or confined ----------------------------

_ALPHABET = st.sampled_from(
    list("/.%\\;:@?#&=+~-_ aAzZ09") + ["%2e", "%2E", "%2f", "%2F", "%5c", "%00", "%0a", "..", "//",
                                        "http:", "//evil:1", "\x00", "\x7f", "\u00e9", "\udcff", "%", "%4"])
_SUBPATH = st.one_of(st.lists(_ALPHABET, max_size=12).map("".join), st.text(max_size=20))
_QUERY = st.one_of(st.lists(_ALPHABET, max_size=8).map("".join), st.text(max_size=10))


def _confined(url: str, upstream: str, transport: str) -> None:
    parts, base = urlsplit(url), urlsplit(upstream)
    assert (parts.scheme, parts.hostname, parts.port) == (base.scheme, base.hostname, base.port), url
    assert parts.username is None and parts.password is None and not parts.fragment, url
    if transport == "sse":
        prefix = base.path[: base.path.rfind("/") + 1] or "/"
        assert parts.path.startswith(prefix), url
    else:
        prefix = base.path.rstrip("/")
        assert parts.path == prefix or parts.path.startswith(prefix + "/"), url
    # What a normalising server would read: decoded, dots resolved. Still under the prefix.
    decoded = unquote(parts.path)
    assert "\\" not in decoded and "\x00" not in decoded
    segments = decoded.split("/")
    assert "." not in segments and ".." not in segments, url
    assert not re.search(r"[\x00-\x20\x7f-\uffff]", url), url


@settings(max_examples=4000, deadline=None, database=None)
@given(subpath=_SUBPATH, query=_QUERY, listing=st.sampled_from(LISTINGS))
def test_any_subpath_and_query_is_refused_or_confined(subpath: str, query: str, listing: tuple[str, str]) -> None:
    upstream, transport = listing
    try:
        url = paths.target_url(upstream, transport, subpath, query)
    except InvalidPath:
        return
    _confined(url, upstream, transport)


# --- the endpoint a legacy upstream announces ---------------------------------------------------

@pytest.mark.parametrize("endpoint, route", [
    ("/legacy/messages/?session_id=abc", "/s/messages/?session_id=abc"),
    ("messages/?session_id=abc", "/s/messages/?session_id=abc"),
    ("http://127.0.0.1:4112/legacy/messages?sessionId=1", "/s/messages?sessionId=1"),
    ("/legacy/x/../messages/", "/s/messages/"),  # the upstream's own dots, resolved as its clients would
])
def test_announced_endpoints_are_rewritten_under_the_slug(endpoint: str, route: str) -> None:
    assert legacy_sse.gateway_endpoint(endpoint, SSE, "s") == route


@pytest.mark.parametrize("endpoint", [
    "http://127.0.0.1:4113/legacy/messages/", "//evil.example/legacy/messages/", "/other/messages/",
    "/legacy/%2e%2e/x", "/legacy/a%2fb", "/legacy/a//b", "/legacy/", "/legacy/m?x=a b",
    "/legacy/m\\x", "/legacy/m?session_id=1&session_id=2", "https://127.0.0.1:4112/legacy/m",
])
def test_announced_endpoints_outside_the_rules_are_not_rewritten(endpoint: str) -> None:
    assert legacy_sse.gateway_endpoint(endpoint, SSE, "s") is None


# --- legacy session identity --------------------------------------------------------------------

def test_a_session_is_its_session_id_however_the_route_is_spelled() -> None:
    one = paths.session_identity("messages/", "session_id=abc")
    for subpath, query in [("messages/", "session_id=abc&x=1"), ("messages/", "x=1&session_id=abc"),
                           ("messages/", "session_id=ab%63"), ("messages", "session_id=abc&")]:
        assert paths.session_identity(subpath, query) == one
    assert paths.session_identity("messages/", "sessionId=abc") == one
    assert paths.session_identity("messages/", "session_id=abd") != one


def test_without_a_session_id_the_route_is_read_canonically() -> None:
    one = paths.session_identity("m/", "a=1&b=2")
    assert paths.session_identity("m/", "b=2&a=1") == one
    assert paths.session_identity("m/", "a=%31&b=2&") == one
    assert paths.session_identity("n/", "a=1&b=2") != one


def test_a_session_id_given_twice_is_refused() -> None:
    with pytest.raises(InvalidPath):
        paths.session_identity("m/", "session_id=a&session_id=b")
    with pytest.raises(InvalidPath):
        paths.session_identity("m/", "session_id=a&sessionId=a")


def test_split_route() -> None:
    assert paths.split_route("/s/a/b?x=1?y") == ("s", "a/b", "x=1?y")
    assert paths.split_route("/s") == ("s", "", "")
    assert paths.split_route("//s/x")[0] == ""  # no slug: 404, never a slug found further on


# --- origins and hosts --------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["gw.example", "gw.example:3010", "127.0.0.1:1", "[::1]:8080", "localhost",
                                  "my_host.internal", "gw.example."])
def test_plain_hosts_are_valid(host: str) -> None:
    assert origins.valid_host(host)


@pytest.mark.parametrize("host", ["", "gw.example:3010/x", "evil\"", "a b", "a\r\nX: y", "user@gw", "gw:99999",
                                  "gw:", "gw.example, evil", "-gw", "gw..example", "[::1", "gw\u00e9", "a" * 300])
def test_other_hosts_are_not(host: str) -> None:
    assert not origins.valid_host(host)


@pytest.mark.parametrize("origin, normalized", [
    ("https://App.Example", "https://app.example"), ("https://app.example:443", "https://app.example"),
    ("http://localhost:80", "http://localhost"), ("http://localhost:6274", "http://localhost:6274"),
    ("http://[::1]:3000", "http://[::1]:3000"),
])
def test_origins_are_normalized(origin: str, normalized: str) -> None:
    assert origins.normalize(origin) == normalized


@pytest.mark.parametrize("origin", ["null", "", "app.example", "https://app.example/", "https://u@app.example",
                                    "ftp://app.example", "https://app.example:x", "https://app .example"])
def test_non_origins_are_none(origin: str) -> None:
    assert origins.normalize(origin) is None

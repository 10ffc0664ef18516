"""addon.forwarding: the upstream URL, and exactly which headers the upstream receives."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.http import Headers
from mitmproxy.net.http import url as mitm_url
from mitmproxy.test import tutils

from addon.admission import aim
from addon.forwarding import destination, drop_untokened, target_url, untokened, upstream_headers, upstream_url_problem
from addon.paths import InvalidPath

HOST = "mcp.publisher.example:8443"


def fwd(fields: list[tuple[str, str]], publisher: dict[str, str] | None = None) -> list[tuple[str, str]]:
    return upstream_headers(fields, publisher or {}, HOST)


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [k.lower() for k, _ in headers]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


# --- target_url -------------------------------------------------------------------------------

@pytest.mark.parametrize("upstream, subpath, query, url", [
    ("http://u:9000/mcp", "", "", "http://u:9000/mcp"),
    ("http://u:9000/mcp/", "", "", "http://u:9000/mcp"),  # trailing slash trimmed
    ("http://u:9000/mcp//", "", "", "http://u:9000/mcp"),
    ("http://u:9000/mcp/", "messages", "", "http://u:9000/mcp/messages"),
    ("http://u:9000/mcp", "a/b/c", "", "http://u:9000/mcp/a/b/c"),
    ("http://u:9000/mcp/", "", "x=1", "http://u:9000/mcp?x=1"),
    ("http://u:9000/mcp/", "messages", "session_id=abc&x=%20", "http://u:9000/mcp/messages?session_id=abc&x=%20"),
    ("https://u.example", "", "", "https://u.example"),
    ("https://u.example/", "sse", "", "https://u.example/sse"),
])
def test_target_url(upstream: str, subpath: str, query: str, url: str) -> None:
    assert target_url(upstream, subpath, query) == url


@pytest.mark.parametrize("url, netloc", [
    ("http://127.0.0.1:3011/mcp", "127.0.0.1:3011"),
    ("https://mcp.example.com/x", "mcp.example.com"),
    ("https://mcp.example.com:8443", "mcp.example.com:8443"),
    ("http://[::1]:8080/mcp", "[::1]:8080"),
    ("http://[::1]/mcp", "[::1]"),
    ("https://[2001:DB8::1]:443/mcp", "[2001:DB8::1]:443"),
])
def test_the_host_header_is_the_netloc_as_written(url: str, netloc: str) -> None:
    assert destination(url).netloc == netloc


@pytest.mark.parametrize("url, target", [
    ("http://u:9000/mcp/a;", "/mcp/a;"),  # mitmproxy's url setter drops the empty ';' part
    ("http://u:9000/mcp/a/.;", "/mcp/a/.;"),
    ("http://u:9000/mcp/a;?x=1", "/mcp/a;?x=1"),
    ("http://u:9000/mcp/a;b;", "/mcp/a;b;"),
    ("HTTP://U:9000/mcp", "/mcp"),
    ("https://u.example", "/"),
    ("http://[::1]:8080/x?y", "/x?y"),
])
def test_request_target_is_the_path_and_query_as_written(url: str, target: str) -> None:
    assert destination(url).target == target


# --- what is stripped -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "Authorization", "authorization", "AUTHORIZATION", "Cookie", "cookie", "Host", "host",
    "X-Forwarded-Host", "x-forwarded-host",
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
    "TE", "te", "Trailer", "Upgrade",
])
def test_consumer_identity_and_hop_by_hop_headers_are_stripped(name: str) -> None:
    got = fwd([(name, "v"), ("Content-Type", "application/json")])
    assert name.lower() not in names(got) or name.lower() == "host"
    assert "v" not in [v for _, v in got]
    assert ("Content-Type", "application/json") in got


def test_headers_named_in_connection_are_stripped() -> None:
    got = fwd([("Connection", "keep-alive, X-Secret-Hop ,  x-other"), ("X-Secret-Hop", "1"),
               ("X-Other", "2"), ("X-Kept", "3")])
    assert names(got) == ["x-kept", "host", "accept-encoding"]


def test_every_connection_header_counts() -> None:
    got = fwd([("Connection", "x-a"), ("connection", "X-B"), ("X-A", "1"), ("X-B", "2"), ("X-C", "3")])
    assert "x-a" not in names(got) and "x-b" not in names(got)
    assert ("X-C", "3") in got


def test_ordinary_headers_pass_in_order_with_their_case_and_duplicates() -> None:
    fields = [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"),
              ("Mcp-Session-Id", "s1"), ("MCP-Protocol-Version", "2025-06-18"), ("User-Agent", "ua"),
              ("X-Dup", "1"), ("X-Dup", "2"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https")]
    got = fwd(fields)
    assert got == fields + [("Host", HOST), ("Accept-Encoding", "identity")]


# --- Host and Accept-Encoding -----------------------------------------------------------------

def test_host_is_the_upstream_authority_and_encoding_identity() -> None:
    got = fwd([("Host", "gw.example:3010"), ("Accept-Encoding", "gzip, br"), ("accept-encoding", "zstd")])
    assert values(got, "host") == [HOST]
    assert values(got, "accept-encoding") == ["identity"]


def test_no_one_can_override_host_or_accept_encoding() -> None:
    got = fwd([("X-Forward-Host", "evil"), ("X-Forward-Accept-Encoding", "gzip")],
              {"Host": "pub-evil", "Accept-Encoding": "br", "host": "x"})
    assert values(got, "host") == [HOST]
    assert values(got, "accept-encoding") == ["identity"]


# --- X-Forward-<Name> unwrapping --------------------------------------------------------------

@pytest.mark.parametrize("wrapped, inner", [
    ("X-Forward-Authorization", "Authorization"),  # the consumer's own upstream credential
    ("x-forward-authorization", "authorization"),
    ("X-Forward-Cookie", "Cookie"),
    ("X-Forward-X-Api-Key", "X-Api-Key"),
    ("X-FORWARD-Api-Token", "Api-Token"),
])
def test_x_forward_is_unwrapped(wrapped: str, inner: str) -> None:
    got = fwd([(wrapped, "secret-v")])
    assert (inner, "secret-v") in got
    assert wrapped.lower() not in names(got)


def test_unwrapped_header_replaces_the_consumers_own() -> None:
    got = fwd([("X-Api-Key", "plain"), ("X-Forward-X-Api-Key", "wrapped"), ("x-api-key", "plain2")])
    assert values(got, "x-api-key") == ["wrapped"]


def test_unwrapped_authorization_never_carries_the_gateway_key() -> None:
    got = fwd([("Authorization", "Bearer mcpm_live_secret"), ("X-Forward-Authorization", "Bearer upstream-tok")])
    assert values(got, "authorization") == ["Bearer upstream-tok"]
    assert all("mcpm_live_secret" not in v for _, v in got)


@pytest.mark.parametrize("wrapped", [
    "X-Forward-Host", "x-forward-host", "X-Forward-Content-Length", "X-Forward-Transfer-Encoding",
    "X-Forward-Connection", "X-Forward-Keep-Alive", "X-Forward-Upgrade", "X-Forward-TE", "X-Forward-Trailer",
    "X-Forward-Proxy-Authorization", "X-Forward-Proxy-Connection",
    # headers the gateway checked on the consumer's request: a wrapped copy must not replace them
    "X-Forward-Mcp-Session-Id", "X-Forward-Mcp-Method", "X-Forward-Mcp-Name", "X-Forward-X-Forwarded-Host",
    "X-Forward-Last-Event-ID",  # a GET without a session is watched for the call parked under the event it names
    "X-Forward-", "X-Forward-a(b", "X-Forward-a b", "X-Forward-a:b",
])
def test_x_forward_is_not_unwrapped_into_forbidden_or_invalid_names(wrapped: str) -> None:
    got = fwd([(wrapped, "smuggled")])
    assert "smuggled" not in [v for _, v in got]
    assert names(got) == ["host", "accept-encoding"]


def test_a_wrapped_session_id_cannot_replace_the_checked_one() -> None:
    got = fwd([("Mcp-Session-Id", "mine"), ("X-Forward-Mcp-Session-Id", "someone-elses")])
    assert values(got, "mcp-session-id") == ["mine"]


def test_a_wrapped_mcp_name_cannot_replace_the_checked_one() -> None:
    got = fwd([("Mcp-Method", "tools/call"), ("Mcp-Name", "cheap"),
               ("X-Forward-Mcp-Name", "expensive"), ("X-Forward-Mcp-Method", "tools/list")])
    assert values(got, "mcp-name") == ["cheap"]
    assert values(got, "mcp-method") == ["tools/call"]


def test_x_forwarded_headers_are_not_x_forward_wrappers() -> None:
    got = fwd([("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https")])
    assert ("X-Forwarded-For", "1.2.3.4") in got and ("X-Forwarded-Proto", "https") in got
    assert "for" not in names(got) and "proto" not in names(got)


def test_a_connection_listed_wrapper_is_stripped_too() -> None:
    got = fwd([("Connection", "X-Forward-Authorization"), ("X-Forward-Authorization", "tok")])
    assert "authorization" not in names(got)


# --- the publisher's headers win --------------------------------------------------------------

def test_publisher_headers_win_over_everything() -> None:
    fields = [("X-Api-Key", "consumer"), ("X-Forward-X-Api-Key", "wrapped"), ("X-Forward-Authorization", "c-tok"),
              ("Content-Type", "application/json")]
    got = fwd(fields, {"x-api-key": "publisher", "Authorization": "Bearer pub-tok"})
    assert values(got, "x-api-key") == ["publisher"]
    assert values(got, "authorization") == ["Bearer pub-tok"]
    assert ("Content-Type", "application/json") in got


def test_publisher_headers_are_added_when_the_consumer_sent_none() -> None:
    got = fwd([("Content-Type", "application/json")], {"X-Publisher-Key": "pub-secret"})
    assert got == [("Content-Type", "application/json"), ("X-Publisher-Key", "pub-secret"),
                   ("Host", HOST), ("Accept-Encoding", "identity")]


@pytest.mark.parametrize("name", ["Content-Length", "Transfer-Encoding", "Connection", "Host"])
def test_publisher_cannot_set_framing_or_hop_by_hop_headers(name: str) -> None:
    got = fwd([("Content-Type", "application/json")], {name: "999"})
    assert "999" not in [v for _, v in got]


def test_fields_may_be_any_iterable() -> None:
    got = upstream_headers(iter([("Authorization", "x"), ("X-A", "1")]), {}, HOST)
    assert got == [("X-A", "1"), ("Host", HOST), ("Accept-Encoding", "identity")]


@given(scheme=st.sampled_from(["http", "https", "HTTP"]),
       host=st.sampled_from(["u", "127.0.0.1", "[::1]", "[2001:DB8::1]", "Example.COM", "bücher.example",
                             "a-b.c"]),
       port=st.one_of(st.none(), st.integers(1, 65535)),
       path=st.sampled_from(["", "/", "/mcp", "/mcp/a;b", "/mcp/a/.;", "/x?y=1", "/x?"]),
       http2=st.booleans())
def test_destination_sets_what_the_url_setter_sets(scheme: str, host: str, port: int | None, path: str,
                                                    http2: bool) -> None:
    """The gateway aims a request by its cached destination: the same scheme, host, port and
    :authority as mitmproxy's `Request.url` setter, on HTTP/1 and HTTP/2 requests alike, except
    for an IPv6 literal: the setter's `url.hostport` leaves its brackets out (`::1:8080`, not an
    authority), the gateway keeps them (`[::1]:8080`)."""
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{path}"
    by_setter, by_destination = tutils.treq(), tutils.treq()
    for request in (by_setter, by_destination):
        request.data.authority = b"client.example" if http2 else b""
        request.data.http_version = b"HTTP/2.0" if http2 else b"HTTP/1.1"
    try:
        by_setter.url = url
    except ValueError:  # a host mitmproxy refuses (as a listing URL, it fails the same way either way)
        with pytest.raises(InvalidPath):
            aim(by_destination, destination(url))
        return
    aim(by_destination, destination(url))
    data = by_destination.data
    assert (data.scheme, data.host, data.port) == (by_setter.data.scheme, by_setter.data.host, by_setter.data.port)
    authority = by_setter.data.authority
    if http2 and ":" in by_setter.host:
        authority = mitm_url.hostport(by_setter.scheme, f"[{by_setter.host}]", by_setter.port).encode()
    assert data.authority == authority
    assert data.path == (path or "/").encode()


@pytest.mark.parametrize("url, authority", [
    ("http://[::1]:8080/mcp", b"[::1]:8080"),
    ("http://[::1]/mcp", b"[::1]"),
    ("http://[::1]:80/mcp", b"[::1]"),  # the scheme's default port is left out, as for a name
    ("https://[::1]:443/mcp", b"[::1]"),
    ("https://[::FFFF:127.0.0.1]:8443/", b"[::ffff:127.0.0.1]:8443"),
    ("http://127.0.0.1:8080/mcp", b"127.0.0.1:8080"),
])
def test_an_ipv6_literal_keeps_its_brackets_in_the_authority(url: str, authority: bytes) -> None:
    """`::1:8080` is no authority (RFC 3986 §3.2.2): an HTTP/2 server cannot read it, and refuses
    a request whose Host, `[::1]:8080`, names another authority than its :authority (RFC 9113 §8.3.1)."""
    assert destination(url).authority == authority
    request = tutils.treq(http_version=b"HTTP/2.0", authority=b"gw.example:3010")  # an HTTP/2 client's request
    aim(request, destination(url))
    assert request.data.authority == authority and request.host_header == authority.decode()


@pytest.mark.parametrize("url", [
    "http://user:secret@u/mcp", "http://user@u:9000/mcp", "https://:secret@u/mcp", "http://u:p@[::1]:8080/mcp",
    "http://a@b@u/mcp",
])
def test_a_listing_url_with_userinfo_is_not_aimed_at(url: str) -> None:
    """Credentials in a URL would reach the upstream as its Host header (`user:secret@u`, no valid
    Host) and be shown wherever the URL is: refused, like any URL the gateway cannot aim at."""
    with pytest.raises(InvalidPath, match="credentials") as e:
        destination(url)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("url", [
    "http://u:99999/mcp",  # port out of range
    "http://u:65536/mcp",
    "http://u:0/mcp",  # mitmproxy's parse reads port 0 as the scheme's default: 80 aimed at, Host `u:0` sent
    "https://u:000/mcp",
    "http://[::1]:0/mcp",
    "http://[::1/mcp",  # unclosed
    "http://u:80x/mcp",
    "http://[::1]x/mcp",  # what follows the literal is no port
    "http://[::1]:8080x/mcp",
    "http://[127.0.0.1]/mcp",  # an IPv4 address is not written in brackets
    "http://[v1.x]/mcp",  # IPvFuture, which mitmproxy would read as a name
    "http://[fe80::1%25eth0]/mcp",  # a zone id: a Host header no server expects
    "http://bücher.example/mcp",  # mitmproxy's parse refuses a non-ASCII name
    "http://:80/mcp",
    "http://u_%41/mcp",
])
def test_a_listing_url_with_a_bad_host_or_port_is_not_aimed_at(url: str) -> None:
    """An InvalidPath (400 invalid_path before the charge), not another error (500 and a traceback)."""
    with pytest.raises(InvalidPath):
        destination(url)


@pytest.mark.parametrize("url", ["http://u:0/mcp", "http://[::1]:00/mcp", "http://u:65536/mcp"])
def test_a_listing_url_with_a_port_out_of_1_to_65535_is_refused(url: str) -> None:
    """As the command and the seed check it (upstream_url_problem): never the gateway aiming at another port
    than its Host names."""
    assert "port" in (upstream_url_problem(url) or "")


@pytest.mark.parametrize("url", ["http://u:1/mcp", "http://u:65535/mcp", "http://[::1]:8080/mcp", "http://u/mcp"])
def test_a_listing_url_with_a_port_of_1_to_65535_is_aimed_at_it(url: str) -> None:
    assert upstream_url_problem(url) is None
    port = url.partition("]")[2] if "[" in url else url[len("http://u"):]
    assert destination(url).port == (int(port[1:].partition("/")[0]) if port.startswith(":") else 80)


@pytest.mark.parametrize("url", ["http://u/mcp/caf\u00e9", "http://u/mcp?q=\u00e9"])
def test_a_listing_url_with_a_non_ascii_path_is_not_aimed_at(url: str) -> None:
    """As mitmproxy's url setter did: the call fails closed rather than send bytes nobody checked."""
    with pytest.raises(InvalidPath):
        destination(url)


def test_the_body_is_framed_by_its_length_whatever_the_client_sent() -> None:
    fields = [("Transfer-Encoding", "chunked"), ("content-length", "99"), ("X-A", "1")]
    got = upstream_headers(fields, {"Content-Length": "7"}, HOST, 42)
    framing = [(k, v) for k, v in got if k.lower() in ("content-length", "transfer-encoding")]
    assert framing == [("Content-Length", "42")]
    assert [k.lower() for k, _ in upstream_headers(fields, {}, HOST)] == ["x-a", "host", "accept-encoding"]


# --- field names that are not tokens ------------------------------------------------------------------

TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # RFC 9110 §5.6.2
NAMES = st.one_of(st.binary(max_size=12), st.text(TCHAR.decode(), min_size=1, max_size=12).map(str.encode),
                  st.sampled_from([b"Content-Length ", b"Cookie\t", b"Mcp-Session-Id\x0b", b"a:b", b"", b"X\rY",
                                   b"Authoriza\xc3\xa7\xc3\xa3o", b"(redacted)", b"x y"]))


@given(st.lists(NAMES, max_size=6))
def test_untokened_is_any_name_empty_or_holding_a_byte_no_token_holds(names: list[bytes]) -> None:
    fields = [(name, b"v") for name in names]
    assert untokened(fields) == any(not name or any(b not in TCHAR for b in name) for name in names)


@given(st.lists(NAMES, max_size=6))
def test_dropping_untokened_fields_keeps_the_others_in_order(names: list[bytes]) -> None:
    headers = Headers([(name, str(i).encode()) for i, name in enumerate(names)])
    drop_untokened(headers)
    assert headers.fields == tuple((name, str(i).encode()) for i, name in enumerate(names)
                                   if name and all(b in TCHAR for b in name))


@pytest.mark.parametrize("name", [b"Content-Length ", b"Mcp-Session-Id\t", b"Cookie\x00", b"X-Forward-Authorization "])
def test_a_name_padded_with_whitespace_or_a_control_character_is_untokened(name: bytes) -> None:
    """mitmproxy (validate_inbound_headers off) keeps it as sent; a server trimming it reads the real field."""
    assert untokened([(b"Host", b"h"), (name, b"5")])
    assert not untokened([(b"Host", b"h"), (name.strip(b" \t\x00"), b"5")])


def test_untokened_is_linear_in_the_names() -> None:
    """Every request's names are asked: a long run of token bytes ending in one that is not, in one name
    or many, is answered in one pass (no backtracking over the run)."""
    started = time.perf_counter()
    assert untokened([(b"a" * 1_000_000 + b" ", b"")])
    assert untokened([(b"ab", b"")] * 200_000 + [(b"x y", b"")])
    assert untokened([(b"a:b" * 300_000, b"")])
    assert time.perf_counter() - started < 2

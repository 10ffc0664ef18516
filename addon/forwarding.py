"""Where a metered request goes and with which headers. Pure."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from collections.abc import Iterable, Mapping

from urllib.parse import urljoin

from mitmproxy.http import Headers
from mitmproxy.net.http import url as mitm_url

from . import paths
from .redaction import TCHAR, TOKEN

# Hop-by-hop headers (RFC 9110 §7.6.1) never cross the gateway; the body it forwards is framed by
# its length (FRAMING, upstream_headers).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "upgrade"})
# The consumer's credentials and identity headers are the gateway's, not the publisher's.
STRIPPED = HOP_BY_HOP | {"authorization", "cookie", "host", "x-forwarded-host"}
# What an `X-Forward-<Name>` header may not become: framing, and the headers the gateway checked
# on the request (session ownership, Mcp-Method/Mcp-Name against the priced body, stripped identity).
NOT_UNWRAPPABLE = HOP_BY_HOP | {"host", "content-length", "transfer-encoding", "x-forwarded-host",
                                "mcp-session-id", "mcp-method", "mcp-name"}
# ... nor, for a consumer, the other request headers the gateway checked and decided on: the body's
# charset and coding (what the meter read as UTF-8, uncompressed, is what it priced), the protocol
# revision (from 2026-07-28 a closed stream is refunded as cancelled: the upstream must see that revision)
# and Last-Event-ID (a GET without a session is watched for the call parked under the event it names).
# A publisher may still set these in upstream_headers: its own server, its own bytes.
CHECKED_ON_REQUEST = frozenset({"content-type", "content-encoding", "mcp-protocol-version", "last-event-id"})
FRAMING = frozenset({"content-length", "transfer-encoding"})  # the gateway frames what it forwards
WRAP_PREFIX = "x-forward-"
_TOKEN = re.compile(rf"^{TCHAR.decode()}+$")
_TOKEN_HEAD = re.compile(rf"{TCHAR.decode()}*")  # a header name up to what it cannot hold
MAX_SHOWN_NAME = 64  # characters of a header name an error repeats
_FOLD = re.compile(rb"[ \t]*[\r\n]+[ \t]*")
# A message's names joined with ':', which no token holds: one match for all of them, linear.
_TOKEN_NAMES = re.compile(TCHAR + rb"+(?::" + TCHAR + rb"+)*")
# What a listing URL's netloc may be, being the upstream's Host: a name (mitmproxy checks its
# labels) or an IPv6 literal in brackets, then an optional port. No zone id, no IPvFuture.
_HOSTPORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[^\[\]:]+)(?::([0-9]*))?\Z")


def target_url(upstream_url: str, subpath: str, query: str) -> str:
    """The listing's upstream URL, trailing '/' trimmed, plus '/<subpath>' and the query.

    Raises paths.InvalidPath for a subpath or query that may not be forwarded (see paths)."""
    return paths.target_url(upstream_url, "streamable", subpath, query)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a request goes, as mitmproxy's request fields hold it."""

    scheme: bytes
    host: str
    port: int
    authority: bytes  # host[:port], the port left out when it is the scheme's default, an IPv6 host in brackets
    target: str  # the path and query, byte for byte as written in the URL ('/' when empty), ASCII
    netloc: str  # host[:port] as written in the URL (never userinfo: refused): the upstream's Host header


def destination(url: str) -> Destination:
    """An absolute URL's destination: scheme, host and port as mitmproxy's `Request.url` setter
    parses them, and the request target exactly as written.

    The setter reparses the path too and drops an empty `;` parameter part or an empty `?` (`/a/.;`
    becomes `/a/.`): the gateway sets the path from this instead, so the upstream gets exactly the
    path the confinement rule checked. The origin is parsed once per listing origin (mitmproxy's
    parse, with its host checks, is most of what setting a URL costs)."""
    parts = paths.split_upstream(url)
    if "@" in parts.netloc:  # a listing URL's userinfo would become the upstream's Host header
        raise paths.InvalidPath("the upstream URL holds credentials (user:password@), which are not forwarded")
    origin = f"{parts.scheme}://{parts.netloc}"
    if not url.lower().startswith(origin.lower()):
        raise paths.InvalidPath("the URL is not absolute")
    target = url[len(origin):] or "/"
    if not target.isascii():  # a listing URL's own path (the client's part is checked ASCII already)
        raise paths.InvalidPath("the upstream URL's path is not ASCII")
    scheme, host, port, authority = _origin(origin)
    return Destination(scheme, host, port, authority, target, parts.netloc)


@functools.lru_cache(maxsize=1024)  # keyed by the listings' upstream origins, the publishers', not client input
def _origin(origin: str) -> tuple[bytes, str, int, bytes]:
    netloc = origin.partition("://")[2]
    hostport = _HOSTPORT.match(netloc)
    # mitmproxy's parse reads port 0 as the scheme's default: the gateway would connect to 80 or 443 while
    # its Host header (the URL's netloc) names port 0.
    if hostport is not None and hostport.group(1) and not _valid_port(hostport.group(1)):
        raise paths.InvalidPath("the upstream URL's port is not 1 to 65535")
    try:
        scheme, host, port, _ = mitm_url.parse(origin)
    except ValueError:  # a bad port, a name mitmproxy refuses (or a non-ASCII one: UnicodeError)
        raise paths.InvalidPath("the upstream URL's host or port is invalid") from None
    name = host.decode("idna")  # as the Request.host setter stores it
    # mitmproxy reads past what follows a literal (`[::1]x`) and takes `[1.2.3.4]` as an address.
    if hostport is None or netloc.startswith("[") != (":" in name):
        raise paths.InvalidPath("the upstream URL's host is not a name, an IPv4 address or a bracketed IPv6 one")
    # An IPv6 literal keeps its brackets: mitmproxy's hostport (so the url setter) writes `::1:8080`,
    # which is no authority, and an HTTP/2 upstream refuses it beside the Host `[::1]:8080`.
    literal = f"[{name}]" if ":" in name else name
    authority = mitm_url.hostport(scheme.decode("utf-8", "surrogateescape"), literal, port)
    try:  # as the Request.authority setter stores it
        encoded = authority.encode("idna", "strict")
    except UnicodeError:
        encoded = authority.encode("utf8", "surrogateescape")
    return scheme, name, port, encoded


def _valid_port(digits: str) -> bool:
    """A URL's port (ASCII digits) is 1 to 65535; read without converting a long run of digits."""
    significant = digits.lstrip("0")
    return 0 < len(significant) <= 5 and int(significant) <= 65535


# Answer headers naming a URL. Location, Content-Location and Refresh reach the client only as a route
# back into the listing; a Link or WWW-Authenticate field naming the upstream's host or a URL's credentials
# is dropped (MCP clients fetch a challenge's resource_metadata URL).
ROUTED = ("location", "content-location")
NAMING = ("link", "www-authenticate")
LINKING = frozenset({b"location", b"content-location", b"refresh", *(name.encode() for name in NAMING)})
# `<delay>[;|,|space] [url=]<url>`, as browsers read it (HTML's "shared declarative refresh steps").
_REFRESH = re.compile(r"\s*(\d[\d.]*)(?:[;,\s]\s*[;,]?\s*(?:url\s*=\s*)?(.*))?\Z", re.IGNORECASE | re.DOTALL)
_AUTHORITY = re.compile(r"//([^/?#\s<>\"',;]*)")  # of every absolute or scheme-relative URL in a field


def names_links(headers: Headers) -> bool:
    """Whether an answer has a field client_links confines: one pass over the raw fields (every answer
    is asked; Headers' `in` folds case per name, several times slower)."""
    return any(name.lower() in LINKING for name, _ in headers.fields)


def client_links(headers: Headers, request_url: str, upstream_url: str, transport: str, slug: str) -> None:
    """Confine the URLs an upstream's answer names to what the client may see (in place).

    Location and Content-Location values, and a Refresh's URL, resolved against the URL the request
    was sent to, are kept only as the gateway route that forwards there again (paths.gateway_route);
    every other one is dropped (a Refresh without a URL, which reloads the same resource, is kept). It
    names the upstream (its address, perhaps credentials) or, being relative, another route of the
    gateway, which the MCP SDKs follow within its origin with the same key and body (another listing
    would run the call and bill it). A Link field is dropped when a URL in it names the upstream's host
    or carries credentials (user:pw@); other Links (relative, other hosts) pass, as clients rarely follow them.
    So is a WWW-Authenticate challenge (an upstream's own 401): MCP clients fetch its resource_metadata URL."""
    def route(url: str) -> str | None:
        try:
            return paths.gateway_route(urljoin(request_url, url.strip()), upstream_url, transport, slug)
        except ValueError:
            return None

    for name in ROUTED:
        if name in headers:
            headers.set_all(name, [r for value in headers.get_all(name) if (r := route(value)) is not None])
    if "refresh" in headers:
        kept = []
        for value in headers.get_all("refresh"):
            if (m := _REFRESH.match(value)) is None:
                continue  # unreadable: perhaps read otherwise by a browser
            url = (m.group(2) or "").strip().strip("'\"")
            if not url:
                kept.append(value)
            elif (r := route(url)) is not None:
                kept.append(f"{m.group(1)}; url={r}")
        headers.set_all("refresh", kept)
    if naming := [name for name in NAMING if name in headers]:
        try:
            upstream_host = (paths.split_upstream(upstream_url).hostname or "").lower()
        except paths.InvalidPath:  # not forwarded to (forwarding.destination refuses it): nothing to hide
            upstream_host = ""
        for name in naming:
            headers.set_all(name, [value for value in headers.get_all(name)
                                   if not any(_names(authority, upstream_host)
                                              for authority in _AUTHORITY.findall(value))])


def _names(authority: str, upstream_host: str) -> bool:
    """The authority carries credentials, or is the upstream's host (on any port)."""
    if "@" in authority:
        return True
    host = authority[1:].partition("]")[0] if authority.startswith("[") else authority.rpartition(":")[0] or authority
    return host.lower() == upstream_host


def folded(fields: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a header field was folded over lines (obs-fold, RFC 9112 §5.2). mitmproxy keeps the line
    break in the value and writes it on as received; a server that reads the continuation line as a
    field of its own (a second Content-Length, say) would read another message than the gateway did."""
    return any(b"\n" in value or b"\r" in value for _, value in fields)


def unfold(headers: Headers) -> None:
    """Replace each obs-fold in `headers` with a space, as RFC 9112 §5.2 lets a proxy do (for an answer:
    a client that reads the continuation as a field of its own would take it from the upstream)."""
    if folded(headers.fields):
        headers.fields = tuple((name, _FOLD.sub(b" ", value)) for name, value in headers.fields)


def untokened(fields: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a field's name is not a token (RFC 9110 §5.1): empty, or holding whitespace (`Cookie : x`),
    a control character, a delimiter such as ':' or a non-ASCII byte. mitmproxy keeps the name as sent when its
    validate_inbound_headers option is off (HTTP/1 and HTTP/2); the gateway's checks compare exact
    names, and a server that trims the name (RFC 9112 §5.1 forbids the space) would read a
    Content-Length, a session or a credential the gateway never checked."""
    names = [name for name, _ in fields]
    if not names:
        return False
    joined = b":".join(names)  # every request's names are asked (twice): one match, not one a name
    return _TOKEN_NAMES.fullmatch(joined) is None or joined.count(b":") != len(names) - 1  # a name's own ':'


def drop_untokened(headers: Headers) -> None:
    """Drop the fields whose name is not a token (an answer's: the gateway read none of them, so the client
    gets the answer the meter read; see untokened)."""
    if untokened(headers.fields):
        headers.fields = tuple((name, value) for name, value in headers.fields if TOKEN.fullmatch(name))


def header_problem(name: str, value: str) -> str | None:
    """Why a publisher's upstream header cannot be sent as given (None: it can). Never repeats the value,
    nor what of a bad name follows its first character a name cannot hold: `Authorization: Bearer sk-...`
    given for NAME=VALUE is all name (shown_name).

    Checked where headers are written (the command, the YAML seed) and again where the gateway
    reads them from the database: a value is written to the upstream byte for byte, so a CR or LF
    in it would start a header line of its own."""
    if not _TOKEN.match(name) or name.endswith("\n"):
        if not name:
            return "a header has no name (NAME=VALUE)"
        head = _TOKEN_HEAD.match(name)
        assert head is not None  # (it matches the empty string)
        who = f"header {shown_name(head.group())}" if head.end() else "a header"
        if name[head.end()] == ":":
            return (f"{who}: a name holds no ':' (give the name and the value apart: --header NAME=VALUE, "
                    "or NAME: VALUE under upstream_headers)")
        return f"{who}: a name holds only letters, digits and !#$%&'*+-.^_`|~ (what follows is not shown)"
    if name.lower() in NOT_UNWRAPPABLE:
        return f"{shown_name(name)} is the gateway's to set (framing, Host, sessions): it is never sent"
    if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value):
        return f"the value of header {shown_name(name)} contains a control character"
    return None


def shown_name(name: str) -> str:
    """A header name (a token: printable ASCII) as an error repeats it: quoted, cut to MAX_SHOWN_NAME."""
    return repr(name[:MAX_SHOWN_NAME]) + ("..." if len(name) > MAX_SHOWN_NAME else "")


def upstream_url_problem(url: str) -> str | None:
    """Why a listing's upstream URL cannot be forwarded to (None: it can). A URL with userinfo is
    never repeated (it may hold a password). The gateway's own parse decides, so what is written can be used."""
    authority = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)", url)  # what urlsplit reads as the netloc
    if authority is not None and "@" in authority.group(1):
        return ("the URL holds credentials (user:password@), which the gateway would send as the upstream's "
                "Host header: send them as an upstream header instead (--header NAME=VALUE, upstream_headers in the "
                "YAML)")
    shown = f"{url!r} " if "@" not in url else "the URL "  # no userinfo left to repeat
    if not url.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return f"{shown}holds whitespace, control or non-ASCII characters (percent-encode them; use punycode hosts)"
    if not re.match(r"(?i)https?://[^/?#]", url):
        return f"{shown}is not http:// or https:// with a host"
    if len(url) > 255:
        return f"{shown}is longer than 255 characters (mcps.upstream_url)"
    try:
        destination(target_url(url, "", ""))
    except paths.InvalidPath as e:
        return f"{shown}cannot be forwarded to: {e}"
    return None


def upstream_headers(
    fields: Iterable[tuple[str, str]], publisher: Mapping[str, str], host: str, body_length: int | None = None
) -> list[tuple[str, str]]:
    """The headers the upstream receives, in order: the consumer's, unwrapped ones, the publisher's.

    `body_length`: the size of the body forwarded (None: no body). The body is forwarded whole, as the
    meter read it, so it is framed by its length, never by the client's framing headers: an HTTP/2
    request needs none, and mitmproxy sent such a body to an HTTP/1 upstream after a head with neither
    Content-Length nor Transfer-Encoding (the upstream read an empty request, then the body as another)."""
    fields = [(name, value) for name, value in fields if name.lower() not in FRAMING]
    named_by_connection = {
        token.strip().lower()
        for name, value in fields
        if name.lower() == "connection"
        for token in value.split(",")
    }
    kept: list[tuple[str, str]] = []
    unwrapped: list[tuple[str, str]] = []
    for name, value in fields:
        lower = name.lower()
        if lower in STRIPPED or lower in named_by_connection:
            continue
        if lower.startswith(WRAP_PREFIX):
            inner = name[len(WRAP_PREFIX):]
            if (inner and _TOKEN.match(inner) and inner.lower() not in NOT_UNWRAPPABLE
                    and inner.lower() not in CHECKED_ON_REQUEST):
                unwrapped.append((inner, value))
            continue
        kept.append((name, value))
    # Later sources win: an unwrapped header replaces the consumer's own, the publisher's replace both.
    result = _override(kept, unwrapped)
    result = _override(result, [(k, v) for k, v in publisher.items() if k.lower() not in NOT_UNWRAPPABLE])
    # Identity encoding lets the meter read streamed bytes as they pass.
    result = _override(result, [("Host", host), ("Accept-Encoding", "identity")])
    return result if body_length is None else [*result, ("Content-Length", str(body_length))]


def _override(base: list[tuple[str, str]], new: list[tuple[str, str]]) -> list[tuple[str, str]]:
    replaced = {name.lower() for name, _ in new}
    return [(k, v) for k, v in base if k.lower() not in replaced] + new

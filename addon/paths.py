"""Confinement: which client paths may be forwarded, and the upstream URL they become. Pure.

The rule (README, "Confinement"): the subpath after `/<slug>/` and the query are checked
before anything is built from them, and refused (400 `invalid_path`) when a server or a proxy
in front of it could read them as something else than what the gateway read:

- a dot segment (`.` or `..`, raw or percent-encoded in any case, also before a `;` parameter);
- an encoded slash or backslash (`%2f`, `%5c`), a raw backslash, an empty segment (`//`, or a
  subpath starting with `/`), a malformed escape (`%zz`, `%4`), an encoded control character;
- a raw control character, space, `#`, or any byte outside printable ASCII;
- a first segment that looks like a scheme (`http:`), which a URL resolver reads as absolute.

Everything else is forwarded exactly as sent, still percent-encoded. The upstream URL is built
by concatenation (never `urljoin` on client data), then verified to keep the listing's scheme,
host and port and to stay under its base path: the listing's path for `http`/`streamable`
listings, the directory of its URL for `sse` listings (`http://h/sse` + `messages/` =
`http://h/messages/`, the way the legacy transport's clients resolve the announced endpoint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, urlsplit

# Printable ASCII except space (0x20), backslash and `#`: what a subpath may hold, raw.
_PATH_CHARS = re.compile(r"[!-~]*\Z")
_QUERY_CHARS = re.compile(r"[!-~]*\Z")
_ESCAPE = re.compile(r"%(..?)?", re.DOTALL)
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}\Z")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_FORBIDDEN_ESCAPES = {"2f", "5c"}  # `/` and `\`: one segment to the gateway, two to many servers
SESSION_PARAMS = ("sessionId", "session_id")  # TypeScript SDK, Python SDK
_NOT_ALNUM = re.compile(r"[^0-9a-z]")


class InvalidPath(ValueError):
    """The path or query may not be forwarded; the message says why (for the client)."""


def check_subpath(subpath: str) -> None:
    """Raise InvalidPath unless `subpath` (after `/<slug>/`, before `?`) may be forwarded as is."""
    if not subpath:
        return
    if not _PATH_CHARS.match(subpath) or "\\" in subpath or "#" in subpath:
        raise InvalidPath("the path holds a control character, space, backslash, '#' or a non-ASCII byte")
    for escape in _ESCAPE.finditer(subpath):
        digits = escape.group(1) or ""
        if not _HEX2.match(digits):
            raise InvalidPath("the path holds a malformed percent escape")
        if digits.lower() in _FORBIDDEN_ESCAPES:
            raise InvalidPath("the path holds an encoded slash or backslash")
        if int(digits, 16) < 0x20 or int(digits, 16) == 0x7F:
            raise InvalidPath("the path holds an encoded control character")
    segments = subpath.split("/")
    # An empty segment; the last one may be empty (a trailing slash).
    if any(not segment for segment in segments[:-1]):
        raise InvalidPath("the path holds an empty segment ('//')")
    for segment in segments:
        name = re.sub("%2e", ".", segment.split(";", 1)[0], flags=re.IGNORECASE)
        if name in (".", ".."):
            raise InvalidPath("the path holds a dot segment ('.' or '..')")
    if _SCHEME.match(segments[0]):
        raise InvalidPath("the path looks like a URL scheme")


def check_query(query: str) -> None:
    """Raise InvalidPath unless the query (after `?`) may be forwarded as sent."""
    if query and (not _QUERY_CHARS.match(query) or "#" in query):
        raise InvalidPath("the query holds a control character, space, '#' or a non-ASCII byte")


@dataclass(frozen=True, slots=True)
class Base:
    """Where a listing's requests may go: origin, the path prefix they stay under, the URL."""

    scheme: str
    netloc: str
    prefix: str  # every forwarded path equals `root` or starts with this (ends with '/')
    root: str  # the path a request without subpath goes to
    query: str  # the listing URL's own query, kept in front of the client's


def split_upstream(upstream_url: str) -> SplitResult:
    """urlsplit, raising InvalidPath for a listing URL it cannot read (e.g. an unclosed `[`)."""
    try:
        return urlsplit(upstream_url)
    except ValueError:
        raise InvalidPath("the upstream URL is malformed") from None


def base_of(upstream_url: str, transport: str) -> Base:
    parts = split_upstream(upstream_url)
    if transport == "sse":
        root = parts.path or "/"
        prefix = root[: root.rfind("/") + 1]
    else:
        root = parts.path.rstrip("/")
        prefix = root + "/"
    return Base(parts.scheme.lower(), parts.netloc, prefix, root, parts.query)


def target_url(upstream_url: str, transport: str, subpath: str, query: str) -> str:
    """The upstream URL for a client's subpath and query, or InvalidPath.

    `http`/`streamable`: the listing URL, trailing `/` trimmed, + `/<subpath>` + `?<query>`.
    `sse`: the directory of the listing URL + `<subpath>`; no subpath: the listing URL itself.
    """
    check_subpath(subpath)
    check_query(query)
    base = base_of(upstream_url, transport)
    path = base.prefix + subpath if subpath else base.root
    # The listing's own query goes with its own URL; an `sse` listing's subpaths are other resources.
    queries = [q for q in (base.query if not subpath or transport != "sse" else "", query) if q]
    url = f"{base.scheme}://{base.netloc}{path}" + ("?" + "&".join(queries) if queries else "")
    verify(url, base)
    return url


def verify(url: str, base: Base) -> None:
    """Belt and braces: the URL keeps the listing's origin and stays under its base path."""
    parts = urlsplit(url)
    if (parts.scheme, parts.netloc) != (base.scheme, base.netloc) or parts.fragment:
        raise InvalidPath("the path leaves the listing's upstream")
    if parts.path != base.root and not parts.path.startswith(base.prefix):
        raise InvalidPath("the path leaves the listing's upstream path")
    segments = re.sub("%2e", ".", parts.path, flags=re.IGNORECASE).split("/")
    if any(s.split(";", 1)[0] in (".", "..") for s in segments) or "\\" in parts.path:
        raise InvalidPath("the path leaves the listing's upstream path")


def gateway_route(url: str, upstream_url: str, transport: str, slug: str) -> str | None:
    """The route under `/<slug>` that the gateway forwards to the upstream's absolute `url` exactly, or
    None when there is none (another origin or path, a fragment, a path the checks refuse). For what
    an upstream names in its answers (a legacy endpoint, a Location): the client goes through the meter."""
    try:
        absolute = urlsplit(url)
        base = base_of(upstream_url, transport)
    except (ValueError, InvalidPath):
        return None
    if (absolute.scheme.lower(), absolute.netloc) != (base.scheme, base.netloc) or absolute.fragment:
        return None
    if absolute.path == base.root and transport != "sse":
        subpath = ""
    elif absolute.path.startswith(base.prefix) and absolute.path != base.prefix:
        subpath = absolute.path[len(base.prefix):]
    else:
        return None  # outside the listing's path, or an `sse` listing's directory itself (not routable)
    try:
        if target_url(upstream_url, transport, subpath, absolute.query) != absolute.geturl():
            return None
    except InvalidPath:
        return None
    route = f"/{slug}/{subpath}" if subpath else f"/{slug}"
    return f"{route}?{absolute.query}" if absolute.query else route


def split_route(path: str) -> tuple[str, str, str]:
    """`/<slug>/<subpath>?<query>` (the request target) as (slug, subpath, query)."""
    route, _, query = path.partition("?")
    slug, _, subpath = route.removeprefix("/").partition("/")
    return slug, subpath, query


def session_identity(subpath: str, query: str) -> str:
    """What identifies a legacy SSE session from the route its POSTs use.

    The session id parameter when there is one (the upstream routes on it, however the rest of the
    route is spelled), else the path with the decoded query's pairs, sorted. Raises InvalidPath
    when the session id is given more than once: the upstream could read another one.
    """
    pairs = parse_qsl(query, keep_blank_values=True)
    ids = [value for name, value in pairs if name in SESSION_PARAMS or _names_session_id(name)]
    if len(ids) > 1:
        raise InvalidPath("the session id is given more than once")
    if ids:
        return f"session={ids[0]}"
    return f"route=/{subpath}?{sorted(pairs)!r}"


def _names_session_id(name: str) -> bool:
    """Whether a server may read the query parameter `name` (decoded) as its session id: `sessionId` or
    `session_id` in any case (ASP.NET Core, under the C# SDK, looks names up ignoring case), with other
    separators (PHP reads `session.id` and `session id` as `session_id`), or as an array (`sessionId[]=x`
    in Express's qs, PHP, Rack; a JavaScript object indexed with ['x'] reads key 'x'). Given beside the
    session id the meter reads, the upstream could run the call in another session."""
    return any(_NOT_ALNUM.sub("", form.upper().lower()) == "sessionid" for form in (name, name.partition("[")[0]))

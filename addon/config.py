"""Gateway configuration: the YAML file named by `mcpmeter_config`, then environment overrides.

The reference gateway's environment variable names are honoured so one `.env` serves both.
Every problem is a ConfigError naming the key and the bad value; the addon turns it into
an OptionsError, which stops mitmdump at start.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from . import forwarding, origins
from .auth import parse_authorization
from .breaker import BreakerConfig, BreakerSettings
from .model import MAX_MICRO_CENTS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]*\Z")
LISTING_STATUSES = ("draft", "review", "live", "paused", "archived")
TRANSPORTS = ("http", "sse", "streamable")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class MysqlSettings:
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    database: str = "mcpmeter"
    pool_size: int = 8


@dataclass(frozen=True, slots=True)
class RedisSettings:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 2
    password: str | None = None
    prefix: str = "mcpmeter:"  # every key the gateway writes starts with this


@dataclass(frozen=True, slots=True)
class Config:
    store: str = "sqlite"
    cache: str = "memory"
    sqlite_path: str = "mcpmeter.db"
    public_url: str | None = None
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed besides public_url's (normalized)
    top_up_url: str | None = None  # named in 402 refusals: where a consumer adds credit
    metrics_token: str | None = None  # GET /metrics needs it as a bearer token (mcpm_live_...)
    metrics_public: bool = False  # without a token, /metrics answers 404 unless this is true
    billable_methods: tuple[str, ...] = ("tools/call",)
    platform_fee_bps: int = 2000
    default_rpm: int = 60
    default_rpd: int = 10_000
    upstream_timeout_ms: int = 30_000
    max_upstream_timeout_ms: int = 300_000
    key_cache_ttl_seconds: float = 60.0
    mcp_cache_ttl_seconds: float = 60.0
    negative_cache_ttl_seconds: float = 30.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_event_bytes: int = 16 * 1024 * 1024  # an SSE event held whole up to this; bigger ones are scanned
    # Request bodies being read (before their request hook: unauthenticated), all connections together:
    # past it a body is refused 503 gateway_busy. max_body_bytes bounds one; connections are unbounded.
    max_reading_bytes: int = 256 * 1024 * 1024
    # Answers not streamed being read (held whole before the response hook), all calls together: past it
    # an answer fails as the upstream's (refunded, 502). One is bounded at max_answer_bytes.
    max_holding_bytes: int = 1024 * 1024 * 1024
    stale_call_seconds: float = 600.0  # a paid call unsettled this long lost its gateway: refund it
    # An upstream connection idle this long is not reused (0: always reused). Servers close idle
    # connections (uvicorn after 5 s, Node after 5 s); a call sent the moment one does fails.
    upstream_idle_seconds: float = 4.0
    task_settle_seconds: float = 3600.0  # a task-augmented call not terminal this long: refunded (task_expired)
    round_settle_seconds: float = 900.0  # an input_required round not followed up this long: billed (addon/deferred.py)
    log_level: str = "info"
    # Credit held in bulk and spent in Redis (addon/store/wallets.py): MySQL + Redis only.
    wallets: bool = False
    wallet_calls: int = 1000  # one hold reserves this many calls' worth of the consumer's credit
    wallet_seconds: float = 60.0  # a wallet is retired after this long (top-ups and a new month seen then)
    shadow: bool = False  # meter and record, but refuse and charge nothing (every listing)
    shadow_listings: tuple[str, ...] = ()  # slugs in shadow mode
    authorization_servers: tuple[str, ...] = ()  # named in the OAuth protected-resource metadata
    mysql: MysqlSettings = field(default_factory=MysqlSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    seed: Mapping[str, Any] = field(default_factory=dict)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)

    @property
    def max_answer_bytes(self) -> int:
        """The most of one answer not streamed that is held whole (the meter reads max_body_bytes of it
        decoded; a compressed one is passed on as sent)."""
        return MAX_ANSWER_FACTOR * self.max_body_bytes


# An answer that is not streamed (JSON, or anything but an event stream) is held up to this many times
# max_body_bytes.
MAX_ANSWER_FACTOR = 4

_ENV_INT = {
    "UPSTREAM_TIMEOUT_MS": "upstream_timeout_ms",
    "MAX_UPSTREAM_TIMEOUT_MS": "max_upstream_timeout_ms",
    "DEFAULT_RPM": "default_rpm",
    "DEFAULT_RPD": "default_rpd",
}
_ENV_FLOAT = {
    "KEY_CACHE_TTL_SECONDS": "key_cache_ttl_seconds",
    "MCP_CACHE_TTL_SECONDS": "mcp_cache_ttl_seconds",
}
_ENV_STR = {
    "MCPMETER_STORE": "store",
    "MCPMETER_CACHE": "cache",
    "MCPMETER_SQLITE_PATH": "sqlite_path",
    "MCPMETER_PUBLIC_URL": "public_url",
    "MCPMETER_ALLOWED_ORIGINS": "allowed_origins",
    "MCPMETER_TOP_UP_URL": "top_up_url",
    "MCPMETER_METRICS_TOKEN": "metrics_token",
    "LOG_LEVEL": "log_level",
}
_ENV_MYSQL = {"DB_HOST": "host", "DB_PORT": "port", "DB_USER": "user", "DB_PASSWORD": "password", "DB_NAME": "database"}
_ENV_REDIS = {"REDIS_HOST": "host", "REDIS_PORT": "port", "REDIS_DB": "db", "REDIS_PASSWORD": "password",
              "MCPMETER_REDIS_PREFIX": "prefix"}


_ENV_LIST = {
    "MCPMETER_SHADOW_LISTINGS": "shadow_listings",
    "MCPMETER_AUTHORIZATION_SERVERS": "authorization_servers",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def sweep_interval(config: Config) -> float:
    """How long the gateway's sweeper sleeps between sweeps (gateway.py, _sweep_forever)."""
    return min(60.0, config.stale_call_seconds / 4)


def expand(value: Any, env: Mapping[str, str], where: str = "") -> Any:
    """`${NAME}` and `${NAME:-default}` in the YAML's strings, from the environment."""
    if isinstance(value, dict):
        return {k: expand(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if env.get(name):
            return env[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}})")
        return default

    return _VAR.sub(one, value)


def load(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (if any), expand ${VARS}, apply environment overrides, validate."""
    raw: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read mcpmeter_config {path!r}: {e.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"mcpmeter_config {path!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"mcpmeter_config {path!r} must be a mapping at the top level")
        raw = expand(dict(loaded), env)
        if "fee_rate" in raw:  # a friendlier spelling than basis points
            raw["platform_fee_bps"] = round(_number(raw.pop("fee_rate"), "fee_rate", float) * 10_000)
    for name, key in _ENV_LIST.items():
        if env.get(name):
            raw[key] = [x.strip() for x in env[name].split(",") if x.strip()]
    if env.get("MCPMETER_SHADOW"):
        raw["shadow"] = env["MCPMETER_SHADOW"]
    if env.get("MCPMETER_WALLETS"):
        raw["wallets"] = env["MCPMETER_WALLETS"]
    for name, key in (_ENV_STR | _ENV_INT | _ENV_FLOAT).items():
        if env.get(name):
            raw[key] = env[name]
    for section, names in (("mysql", _ENV_MYSQL), ("redis", _ENV_REDIS)):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"{section} must be a mapping")
        sub = dict(raw.get(section) or {})
        for name, key in names.items():
            if env.get(name) is not None and (env[name] != "" or key == "password"):
                sub[key] = env[name]
        raw[section] = sub
    return _build(raw)


def _build(raw: dict[str, Any]) -> Config:
    known = set(Config.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("mysql", "redis", "seed", "circuit_breaker"):
            continue
        default = Config.__dataclass_fields__[key].default
        if key == "billable_methods":
            if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
                raise ConfigError("billable_methods must be a list of JSON-RPC method names")
            values[key] = tuple(value)
        elif key == "allowed_origins":
            values[key] = _origins(value)
        elif key in ("shadow", "wallets"):
            values[key] = _flag(value, key)
        elif key in ("shadow_listings", "authorization_servers"):
            if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
                raise ConfigError(f"{key} must be a list of strings")
            if key == "shadow_listings" and (bad := [x for x in value if not SLUG_RE.match(x)]):
                raise ConfigError(f"shadow_listings: {bad[0]!r} is not a listing slug")
            if key == "authorization_servers" and (bad := [x for x in value if not re.match(r"^https?://[^/\s]+", x)]):
                raise ConfigError(f"authorization_servers: {bad[0]!r} must be an http:// or https:// URL")
            values[key] = tuple(x.rstrip("/") if key == "authorization_servers" else x for x in value)
        elif key == "public_url":
            values[key] = _public_url(str(value)) if value else None
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, not {value!r}")
            values[key] = value
        elif default is None or isinstance(default, str):
            values[key] = None if value is None and default is None else str(value)
        elif isinstance(default, int):
            values[key] = _number(value, key, int)
        else:
            values[key] = _number(value, key, float)
    # Unset, the bounds of all bodies being read take one body's (a file that raised max_body_bytes past
    # them was valid before they came, and must still start); set, they are checked below.
    defaults = {key: Config.__dataclass_fields__[key].default
                for key in ("max_body_bytes", "max_reading_bytes", "max_holding_bytes")}
    body = values.get("max_body_bytes", defaults["max_body_bytes"])
    values.setdefault("max_reading_bytes", max(defaults["max_reading_bytes"], body))
    values.setdefault("max_holding_bytes", max(defaults["max_holding_bytes"], MAX_ANSWER_FACTOR * body))
    cfg = Config(
        **values,
        mysql=_section(MysqlSettings, raw.get("mysql"), "mysql"),
        redis=_section(RedisSettings, raw.get("redis"), "redis"),
        seed=_seed(raw.get("seed")),
        circuit_breaker=_circuit_breaker(raw.get("circuit_breaker")),
    )
    if cfg.store not in ("sqlite", "mysql"):
        raise ConfigError(f"store (MCPMETER_STORE) must be 'sqlite' or 'mysql', not {cfg.store!r}")
    if cfg.cache not in ("memory", "redis"):
        raise ConfigError(f"cache (MCPMETER_CACHE) must be 'memory' or 'redis', not {cfg.cache!r}")
    if cfg.wallets and (cfg.store, cfg.cache) != ("mysql", "redis"):
        raise ConfigError("wallets: true needs store: mysql and cache: redis (the wallets live in Redis)")
    if not 1 <= cfg.wallet_calls <= 1_000_000:
        raise ConfigError(f"wallet_calls must be between 1 and 1000000, not {cfg.wallet_calls}")
    if not 1 <= cfg.wallet_seconds <= 3600:
        raise ConfigError(f"wallet_seconds must be between 1 and 3600, not {cfg.wallet_seconds}")
    if "{" in cfg.redis.prefix or "}" in cfg.redis.prefix:
        raise ConfigError("redis.prefix must not hold { or }: the keys' hash tags follow it (Redis Cluster)")
    for key in ("default_rpm", "default_rpd", "upstream_timeout_ms", "max_upstream_timeout_ms", "max_body_bytes",
                "max_event_bytes", "max_reading_bytes", "max_holding_bytes"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, not {getattr(cfg, key)}")
    if cfg.max_reading_bytes < cfg.max_body_bytes:
        raise ConfigError(f"max_reading_bytes ({cfg.max_reading_bytes}) must be at least max_body_bytes "
                          f"({cfg.max_body_bytes}): else a body within its limit could never be read")
    if cfg.max_holding_bytes < cfg.max_answer_bytes:
        raise ConfigError(f"max_holding_bytes ({cfg.max_holding_bytes}) must be at least {MAX_ANSWER_FACTOR} * "
                          f"max_body_bytes ({cfg.max_answer_bytes}): else an answer within its limit is never read")
    for key in ("key_cache_ttl_seconds", "mcp_cache_ttl_seconds", "negative_cache_ttl_seconds"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must not be negative, not {getattr(cfg, key)}")
    if cfg.stale_call_seconds <= cfg.max_upstream_timeout_ms / 1000:
        raise ConfigError(f"stale_call_seconds ({cfg.stale_call_seconds}) must exceed the longest upstream timeout "
                          f"(max_upstream_timeout_ms = {cfg.max_upstream_timeout_ms})")
    if not 0 <= cfg.upstream_idle_seconds <= 3600:
        raise ConfigError(f"upstream_idle_seconds must be between 0 and 3600, not {cfg.upstream_idle_seconds}")
    for key in ("task_settle_seconds", "round_settle_seconds"):
        if not cfg.max_upstream_timeout_ms / 1000 < getattr(cfg, key) <= 30 * 86400:
            raise ConfigError(f"{key} ({getattr(cfg, key)}) must exceed the longest upstream timeout "
                              f"(max_upstream_timeout_ms = {cfg.max_upstream_timeout_ms}) and be at most 30 days")
    if cfg.metrics_token is not None:
        cred = parse_authorization(f"Bearer {cfg.metrics_token}")
        if cred is None or cred.token != cfg.metrics_token or cred.kind != "live" or len(cred.token) < 32:
            raise ConfigError("metrics_token must look like mcpm_live_<at least 22 letters and digits> "
                              "(the gateway redacts such bearer tokens from flows and logs)")
        if cfg.metrics_public:
            raise ConfigError("metrics_public: true and a metrics_token contradict each other; set one")
    if not 0 <= cfg.platform_fee_bps <= 10_000:
        raise ConfigError(f"platform_fee_bps must be between 0 and 10000, not {cfg.platform_fee_bps}")
    if cfg.log_level.lower() not in ("trace", "debug", "info", "warn", "warning", "error", "fatal"):
        raise ConfigError(f"log_level {cfg.log_level!r} is not one of trace/debug/info/warn/error/fatal")
    return cfg


def _origins(value: Any) -> tuple[str, ...]:
    """A list (YAML) or a comma-separated string (MCPMETER_ALLOWED_ORIGINS) of scheme://host[:port]."""
    if isinstance(value, str):
        value = [v for v in (part.strip() for part in value.split(",")) if v]
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("allowed_origins must be a list of origins like https://app.example")
    normalized = []
    for v in value:
        origin = origins.normalize(v)
        if origin is None:
            raise ConfigError(f"allowed_origins: {v!r} is not an origin (scheme://host[:port], no path)")
        normalized.append(origin)
    return tuple(normalized)


def _public_url(value: str) -> str:
    """scheme://host[:port][/path], trailing '/' trimmed: reflected in every 401's WWW-Authenticate (a
    quoted string) and the OAuth metadata, and its origin is the one browsers may use. Never repeated
    when it may hold credentials."""
    url = value.rstrip("/")
    origin = re.match(r"(?i)https?://[^/?#]*", url)
    path = url[origin.end():] if origin else ""
    if origin is None or origins.of_url(url) is None or not re.fullmatch(r"(/[!$&'()*+,;=:@%.~\w-]*)*", path, re.ASCII):
        shown = "" if "@" in value else f" {value!r}"
        raise ConfigError(f"public_url{shown} must be http:// or https://, a host (no user:password@), an optional "
                          "port and path, and nothing else (no query, quote or whitespace)")
    return url


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key} must be true or false, not {value!r}")


def _number(value: Any, key: str, kind: type) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, not {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ConfigError(f"{key} must be a number, not {value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):  # nan, .inf: no setting means them
        raise ConfigError(f"{key} must be a finite number, not {value!r}")
    if kind is int and isinstance(value, float) and value != number:
        raise ConfigError(f"{key} must be a whole number, not {value!r}")
    return number


def _section(cls: type[DataclassInstance], raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a mapping")
    fields = cls.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {name} key(s): {', '.join(unknown)}")
    values = {}
    for key, value in raw.items():
        default = fields[key].default
        if isinstance(default, int) and not isinstance(default, bool):
            values[key] = _number(value, f"{name}.{key}", int)
        else:
            values[key] = None if value is None else str(value)
    return cls(**values)


# --- circuit breakers: defaults, and listings (by slug) with their own thresholds ---------------


def _circuit_breaker(raw: Any) -> BreakerConfig:
    if raw is None:
        return BreakerConfig()
    if not isinstance(raw, dict) or set(raw) - {"failures", "cooldown_seconds", "listings"}:
        raise ConfigError("circuit_breaker must be a mapping of failures, cooldown_seconds and listings")
    default = _breaker_settings(raw, "circuit_breaker", BreakerSettings())
    listings = raw.get("listings") or {}
    if not isinstance(listings, dict):
        raise ConfigError("circuit_breaker.listings must map listing slugs to their thresholds")
    own = {}
    for slug, x in listings.items():
        where = f"circuit_breaker.listings.{slug}"
        if not isinstance(x, dict) or set(x) - {"failures", "cooldown_seconds"}:
            raise ConfigError(f"{where} must be a mapping of failures and cooldown_seconds")
        own[str(slug)] = _breaker_settings(x, where, default)
    return BreakerConfig(default, own)


def _breaker_settings(x: dict[str, Any], where: str, base: BreakerSettings) -> BreakerSettings:
    failures = _nonneg(x.get("failures", base.failures), f"{where}.failures")
    cooldown = _number(x.get("cooldown_seconds", base.cooldown_seconds), f"{where}.cooldown_seconds", float)
    if not cooldown > 0:
        raise ConfigError(f"{where}.cooldown_seconds must be positive, not {cooldown}")
    return BreakerSettings(failures, cooldown)


# --- the embedded store's seed: catalogue and consumers declared in the YAML -----------------

_LISTING_KEYS = {
    "slug", "upstream_url", "status", "transport", "upstream_headers", "free_calls_per_consumer",
    "rate_limit_per_minute", "rate_limit_per_day", "upstream_timeout_seconds", "price_micro_cents",
    "tool_prices", "bill_tool_errors",
}
_CONSUMER_KEYS = {"key", "user_id", "project_id", "credit_micro_cents", "status", "spending_cap_cents_per_month"}


def _seed(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {"listings": [], "consumers": []}
    if not isinstance(raw, dict) or set(raw) - {"listings", "consumers"}:
        raise ConfigError("seed must be a mapping with 'listings' and 'consumers' lists")
    for key in ("listings", "consumers"):
        if not isinstance(raw.get(key) or [], list):
            raise ConfigError(f"seed.{key} must be a list")
    listings = [_listing(x, i) for i, x in enumerate(raw.get("listings") or [])]
    consumers = [_consumer(x, i) for i, x in enumerate(raw.get("consumers") or [])]
    slugs = [x["slug"] for x in listings]
    if len(set(slugs)) != len(slugs):
        raise ConfigError("seed.listings: each slug may be listed once")
    return {"listings": listings, "consumers": consumers}


def _entry(x: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(x, dict):
        raise ConfigError(f"{where} must be a mapping")
    if unknown := sorted(set(x) - allowed):
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _listing(x: Any, i: int) -> dict[str, Any]:
    where = f"seed.listings[{i}]"
    _entry(x, where, _LISTING_KEYS)
    slug = x.get("slug")
    if not isinstance(slug, str) or not SLUG_RE.match(slug):
        raise ConfigError(f"{where}.slug {slug!r} must match {SLUG_RE.pattern}")
    where = f"seed.listings[{slug}]"
    status = x.get("status", "live")
    if status not in LISTING_STATUSES:
        raise ConfigError(f"{where}.status {status!r} is not one of {', '.join(LISTING_STATUSES)}")
    transport = x.get("transport", "streamable")
    if transport not in TRANSPORTS:
        raise ConfigError(f"{where}.transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    url = x.get("upstream_url")
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"{where}.upstream_url {url!r} must be an http:// or https:// URL")
    if url is not None and (problem := forwarding.upstream_url_problem(url)) is not None:
        raise ConfigError(f"{where}.upstream_url: {problem}")  # never the URL itself: it may hold a password
    headers = x.get("upstream_headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ConfigError(f"{where}.upstream_headers must map header names to strings")
    for name, value in headers.items():
        if (problem := forwarding.header_problem(name, value)) is not None:
            raise ConfigError(f"{where}.upstream_headers: {problem}")
    if len({name.lower() for name in headers}) < len(headers):  # the gateway would send each
        raise ConfigError(f"{where}.upstream_headers names a header twice (names are case-insensitive)")
    if not isinstance(x.get("bill_tool_errors", False), bool):
        raise ConfigError(f"{where}.bill_tool_errors must be true or false, not {x['bill_tool_errors']!r}")
    prices = x.get("tool_prices") or {}
    if not isinstance(prices, dict):
        raise ConfigError(f"{where}.tool_prices must map tool names to µ¢ prices")
    out = {
        "slug": slug, "status": status, "transport": transport, "upstream_url": url,
        "upstream_headers": headers,
        "tool_prices": {str(k): _nonneg(v, f"{where}.tool_prices.{k}") for k, v in prices.items()},
        "bill_tool_errors": x.get("bill_tool_errors", False),
    }
    for key in ("free_calls_per_consumer", "rate_limit_per_minute", "rate_limit_per_day",
                "upstream_timeout_seconds", "price_micro_cents"):
        value = x.get(key)
        out[key] = None if value is None else _nonneg(value, f"{where}.{key}")
    out["free_calls_per_consumer"] = out["free_calls_per_consumer"] or 0
    return out


def _consumer(x: Any, i: int) -> dict[str, Any]:
    where = f"seed.consumers[{i}]"
    _entry(x, where, _CONSUMER_KEYS)
    key = x.get("key")
    cred = parse_authorization(f"Bearer {key}") if isinstance(key, str) else None
    if cred is None or cred.token != key or cred.kind == "oauth":
        raise ConfigError(f"{where}.key must look like mcpm_test_<letters and digits> or mcpm_live_...")
    status = x.get("status", "active")
    if status not in ("active", "suspended"):
        raise ConfigError(f"{where}.status {status!r} must be 'active' or 'suspended'")
    cap = x.get("spending_cap_cents_per_month")
    return {
        "key": key, "env": cred.kind, "status": status,
        "user_id": _nonneg(x.get("user_id", i + 1), f"{where}.user_id"),
        "project_id": _nonneg(x.get("project_id", x.get("user_id", i + 1)), f"{where}.project_id"),
        "credit_micro_cents": _nonneg(x.get("credit_micro_cents", 0), f"{where}.credit_micro_cents"),
        "spending_cap_cents_per_month": None if cap is None else _nonneg(cap, f"{where}.spending_cap_cents_per_month"),
    }


def _nonneg(value: Any, where: str) -> int:
    number = _number(value, where, int)
    if number < 0:
        raise ConfigError(f"{where} must not be negative, not {value!r}")
    if number > MAX_MICRO_CENTS:  # the store would fail at start (SQLite INTEGER, MySQL BIGINT)
        raise ConfigError(f"{where} {value!r} is more than {MAX_MICRO_CENTS}")
    return number

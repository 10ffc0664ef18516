"""addon.config.load: defaults, YAML, the reference's environment names, and loud errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from addon.config import Config, ConfigError, MysqlSettings, RedisSettings, load

NO_ENV: dict[str, str] = {}
URL = "http://127.0.0.1:3011/mcp"
KEY = "mcpm_test_demo0123456789"


def write(tmp_path: Path, data: Any) -> str:
    path = tmp_path / "mcpmeter.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def load_yaml(tmp_path: Path, data: Any, env: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, data), environ=env or NO_ENV)


def error(tmp_path: Path, data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_yaml(tmp_path, data, env)
    return str(e.value)


def env_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as e:
        load(None, environ=env)
    return str(e.value)


# --- defaults -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [None, ""])
def test_defaults_with_no_file(path: str | None) -> None:
    cfg = load(path, environ=NO_ENV)
    assert cfg == Config(seed={"listings": [], "consumers": []})
    assert (cfg.store, cfg.cache, cfg.sqlite_path, cfg.public_url) == ("sqlite", "memory", "mcpmeter.db", None)
    assert cfg.billable_methods == ("tools/call",)
    assert (cfg.platform_fee_bps, cfg.default_rpm, cfg.default_rpd) == (2000, 60, 10_000)
    assert (cfg.upstream_timeout_ms, cfg.max_upstream_timeout_ms) == (30_000, 300_000)
    assert cfg.max_body_bytes == 10 * 1024 * 1024
    assert cfg.max_event_bytes == 16 * 1024 * 1024
    assert cfg.mysql == MysqlSettings("127.0.0.1", 3306, "root", "", "mcpmeter", 8)
    assert cfg.redis == RedisSettings("127.0.0.1", 6379, 2, None, "mcpmeter:")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n"])
def test_an_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    assert load_yaml(tmp_path, text) == load(None, environ=NO_ENV)


def test_load_never_reads_the_real_environment_when_given_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_RPM", "7")
    assert load(None, environ={}).default_rpm == 60
    assert load(None).default_rpm == 7  # without environ=, os.environ is honoured


# --- YAML values --------------------------------------------------------------------------------

def test_yaml_values(tmp_path: Path) -> None:
    cfg = load_yaml(tmp_path, {
        "store": "mysql", "cache": "redis", "sqlite_path": "/tmp/x.db", "public_url": "https://gw.example/",
        "billable_methods": ["tools/call", "resources/read"], "platform_fee_bps": 1500,
        "default_rpm": 10, "default_rpd": 100, "upstream_timeout_ms": 5000, "max_upstream_timeout_ms": 60000,
        "key_cache_ttl_seconds": 5, "mcp_cache_ttl_seconds": 7, "negative_cache_ttl_seconds": 3,
        "max_body_bytes": 1024, "log_level": "debug",
        "mysql": {"host": "db", "port": 3307, "user": "u", "password": 1234, "database": "m", "pool_size": 2},
        "redis": {"host": "r", "port": 6380, "db": 5, "password": "pw", "prefix": "p:"},
    })
    assert (cfg.store, cfg.cache, cfg.sqlite_path) == ("mysql", "redis", "/tmp/x.db")
    assert cfg.public_url == "https://gw.example"  # trailing slash trimmed
    assert cfg.billable_methods == ("tools/call", "resources/read")
    assert (cfg.platform_fee_bps, cfg.default_rpm, cfg.default_rpd) == (1500, 10, 100)
    assert (cfg.upstream_timeout_ms, cfg.max_upstream_timeout_ms, cfg.max_body_bytes) == (5000, 60000, 1024)
    assert (cfg.key_cache_ttl_seconds, cfg.mcp_cache_ttl_seconds, cfg.negative_cache_ttl_seconds) == (5, 7, 3)
    assert cfg.log_level == "debug"
    assert cfg.mysql == MysqlSettings("db", 3307, "u", "1234", "m", 2)
    assert cfg.redis == RedisSettings("r", 6380, 5, "pw", "p:")


@pytest.mark.parametrize("fee_rate, bps", [(0.2, 2000), (0, 0), (1, 10_000), (0.155, 1550), ("0.3", 3000)])
def test_fee_rate_is_a_friendlier_spelling_of_basis_points(tmp_path: Path, fee_rate: Any, bps: int) -> None:
    assert load_yaml(tmp_path, {"fee_rate": fee_rate}).platform_fee_bps == bps


@pytest.mark.parametrize("key", ["key_cache_ttl_seconds", "mcp_cache_ttl_seconds", "negative_cache_ttl_seconds"])
def test_cache_ttls_may_be_fractional(tmp_path: Path, key: str) -> None:
    assert getattr(load_yaml(tmp_path, {key: 0.5}), key) == 0.5
    assert getattr(load_yaml(tmp_path, {key: "2.5"}), key) == 2.5


def test_whole_float_is_accepted_for_an_integer_key(tmp_path: Path) -> None:
    assert load_yaml(tmp_path, {"default_rpm": 30.0}).default_rpm == 30


def test_example_config_loads(tmp_path: Path) -> None:
    cfg = load(str(Path(__file__).parent.parent / "config.example.yaml"), environ=NO_ENV)
    assert cfg.seed["listings"] and cfg.seed["consumers"]


# --- environment overrides (the reference's names) ----------------------------------------------

@pytest.mark.parametrize("name, value, get, expected", [
    ("DB_HOST", "db.internal", lambda c: c.mysql.host, "db.internal"),
    ("DB_PORT", "3307", lambda c: c.mysql.port, 3307),
    ("DB_USER", "meter", lambda c: c.mysql.user, "meter"),
    ("DB_PASSWORD", "s3cret", lambda c: c.mysql.password, "s3cret"),
    ("DB_NAME", "prod", lambda c: c.mysql.database, "prod"),
    ("REDIS_HOST", "cache.internal", lambda c: c.redis.host, "cache.internal"),
    ("REDIS_PORT", "6390", lambda c: c.redis.port, 6390),
    ("REDIS_DB", "7", lambda c: c.redis.db, 7),
    ("REDIS_PASSWORD", "rpw", lambda c: c.redis.password, "rpw"),
    ("MCPMETER_REDIS_PREFIX", "x:", lambda c: c.redis.prefix, "x:"),
    ("LOG_LEVEL", "warn", lambda c: c.log_level, "warn"),
    ("LOG_LEVEL", "TRACE", lambda c: c.log_level, "TRACE"),
    ("KEY_CACHE_TTL_SECONDS", "5", lambda c: c.key_cache_ttl_seconds, 5),
    ("KEY_CACHE_TTL_SECONDS", "0.25", lambda c: c.key_cache_ttl_seconds, 0.25),
    ("MCP_CACHE_TTL_SECONDS", "12", lambda c: c.mcp_cache_ttl_seconds, 12),
    ("MCP_CACHE_TTL_SECONDS", "1.5", lambda c: c.mcp_cache_ttl_seconds, 1.5),
    ("UPSTREAM_TIMEOUT_MS", "1500", lambda c: c.upstream_timeout_ms, 1500),
    ("MAX_UPSTREAM_TIMEOUT_MS", "120000", lambda c: c.max_upstream_timeout_ms, 120_000),
    ("DEFAULT_RPM", "5", lambda c: c.default_rpm, 5),
    ("DEFAULT_RPD", "50", lambda c: c.default_rpd, 50),
    ("MCPMETER_STORE", "mysql", lambda c: c.store, "mysql"),
    ("MCPMETER_CACHE", "redis", lambda c: c.cache, "redis"),
    ("MCPMETER_SQLITE_PATH", "/data/m.db", lambda c: c.sqlite_path, "/data/m.db"),
    ("MCPMETER_PUBLIC_URL", "https://gw.example/", lambda c: c.public_url, "https://gw.example"),
])
def test_environment_overrides(tmp_path: Path, name: str, value: str, get: Any, expected: Any) -> None:
    assert get(load(None, environ={name: value})) == expected
    # and over the file's own value
    yaml_cfg = {"store": "sqlite", "cache": "memory", "default_rpm": 99, "log_level": "error",
                "mysql": {"host": "file-db", "port": 1, "password": "file"},
                "redis": {"host": "file-r", "port": 2, "db": 3}}
    assert get(load_yaml(tmp_path, yaml_cfg, {name: value})) == expected


def test_yaml_values_stand_when_the_environment_is_silent(tmp_path: Path) -> None:
    cfg = load_yaml(tmp_path, {"default_rpm": 99, "mysql": {"host": "file-db"}}, {"UNRELATED": "1"})
    assert (cfg.default_rpm, cfg.mysql.host) == (99, "file-db")


@pytest.mark.parametrize("name", ["DB_HOST", "DB_PORT", "REDIS_PORT", "DEFAULT_RPM", "MCPMETER_STORE", "LOG_LEVEL"])
def test_an_empty_environment_variable_is_ignored(tmp_path: Path, name: str) -> None:
    assert load(None, environ={name: ""}) == load(None, environ=NO_ENV)


def test_an_empty_password_in_the_environment_clears_the_files(tmp_path: Path) -> None:
    cfg = load_yaml(tmp_path, {"mysql": {"password": "file"}, "redis": {"password": "file"}},
                    {"DB_PASSWORD": "", "REDIS_PASSWORD": ""})
    assert (cfg.mysql.password, cfg.redis.password) == ("", "")


@pytest.mark.parametrize("env, key", [
    ({"DEFAULT_RPM": "abc"}, "default_rpm"),
    ({"DEFAULT_RPD": "1e3x"}, "default_rpd"),
    ({"DEFAULT_RPM": "1.5"}, "default_rpm"),
    ({"UPSTREAM_TIMEOUT_MS": "thirty"}, "upstream_timeout_ms"),
    ({"MAX_UPSTREAM_TIMEOUT_MS": "-"}, "max_upstream_timeout_ms"),
    ({"KEY_CACHE_TTL_SECONDS": "soon"}, "key_cache_ttl_seconds"),
    ({"MCP_CACHE_TTL_SECONDS": "1,5"}, "mcp_cache_ttl_seconds"),
    ({"DB_PORT": "mysql"}, "mysql.port"),
    ({"REDIS_PORT": "x"}, "redis.port"),
    ({"REDIS_DB": "two"}, "redis.db"),
    ({"DEFAULT_RPM": "0"}, "default_rpm"),
    ({"DEFAULT_RPD": "-1"}, "default_rpd"),
    ({"UPSTREAM_TIMEOUT_MS": "0"}, "upstream_timeout_ms"),
    ({"MCPMETER_STORE": "postgres"}, "MCPMETER_STORE"),
    ({"MCPMETER_CACHE": "memcached"}, "MCPMETER_CACHE"),
    ({"LOG_LEVEL": "verbose"}, "log_level"),
])
def test_bad_environment_values_name_the_key(env: dict[str, str], key: str) -> None:
    message = env_error(env)
    assert key in message
    assert list(env.values())[0] in message


# --- errors: the file itself --------------------------------------------------------------------

def test_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read mcpmeter_config") as e:
        load(missing, environ=NO_ENV)
    assert missing in str(e.value)


def test_a_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read mcpmeter_config"):
        load(str(tmp_path), environ=NO_ENV)


@pytest.mark.parametrize("text", ["store: [sqlite\n", "a: b: c\n", "store: sqlite\n  cache: x\n- y\n",
                                  "{:\n", "\t- x\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    message = error(tmp_path, text)
    assert "is not valid YAML" in message and "mcpmeter.yaml" in message


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"store: \xff\xfe\n")
    with pytest.raises(ConfigError):
        load(str(path), environ=NO_ENV)


@pytest.mark.parametrize("text", ["- store: sqlite\n", "just a string\n", "42\n", "true\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    assert "must be a mapping at the top level" in error(tmp_path, text)


@pytest.mark.parametrize("data, key", [
    ({"stroe": "sqlite"}, "stroe"),
    ({"DB_HOST": "x"}, "DB_HOST"),
    ({"mysql": {"hostname": "x"}}, "hostname"),
    ({"redis": {"database": 1}}, "database"),
    ({"seed": {"listing": []}}, "seed"),
])
def test_unknown_keys_are_named(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    assert key in error(tmp_path, data)


@pytest.mark.parametrize("data, key", [
    ({"store": "postgres"}, "store"),
    ({"cache": "memcached"}, "cache"),
    ({"store": "SQLITE"}, "store"),
])
def test_unknown_backend(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    message = error(tmp_path, data)
    assert key in message and list(data.values())[0] in message


@pytest.mark.parametrize("data, key", [
    ({"default_rpm": "sixty"}, "default_rpm"),
    ({"default_rpm": True}, "default_rpm"),
    ({"default_rpm": 1.5}, "default_rpm"),
    ({"default_rpm": None}, "default_rpm"),
    ({"default_rpm": [60]}, "default_rpm"),
    ({"default_rpm": 0}, "default_rpm"),
    ({"default_rpd": -5}, "default_rpd"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"max_event_bytes": 0}, "max_event_bytes"),
    ({"max_event_bytes": "big"}, "max_event_bytes"),
    ({"max_upstream_timeout_ms": -1}, "max_upstream_timeout_ms"),
    ({"platform_fee_bps": 10_001}, "platform_fee_bps"),
    ({"platform_fee_bps": -1}, "platform_fee_bps"),
    ({"platform_fee_bps": "20%"}, "platform_fee_bps"),
    ({"fee_rate": "twenty"}, "fee_rate"),
    ({"fee_rate": 1.5}, "platform_fee_bps"),
    ({"key_cache_ttl_seconds": "x"}, "key_cache_ttl_seconds"),
    ({"key_cache_ttl_seconds": False}, "key_cache_ttl_seconds"),
    ({"mysql": {"port": "x"}}, "mysql.port"),
    ({"mysql": {"port": 3306.5}}, "mysql.port"),
    ({"mysql": {"pool_size": None}}, "mysql.pool_size"),
    ({"redis": {"db": "two"}}, "redis.db"),
    ({"log_level": "loud"}, "log_level"),
    ({"billable_methods": "tools/call"}, "billable_methods"),
    ({"billable_methods": ["tools/call", ""]}, "billable_methods"),
    ({"billable_methods": [1]}, "billable_methods"),
])
def test_bad_values_name_the_key(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    assert key in error(tmp_path, data)


@pytest.mark.parametrize("section", ["mysql", "redis"])
@pytest.mark.parametrize("value", ["localhost", ["host", "db"], 5, True])
def test_a_backend_section_must_be_a_mapping(tmp_path: Path, section: str, value: Any) -> None:
    assert section in error(tmp_path, {section: value})


@pytest.mark.parametrize("section", ["mysql", "redis"])
def test_a_backend_section_must_be_a_mapping_with_env_overrides_too(tmp_path: Path, section: str) -> None:
    assert section in error(tmp_path, {section: "localhost"}, {"DB_HOST": "x", "REDIS_HOST": "y"})


# --- seed: listings -----------------------------------------------------------------------------

def seed(*listings: dict[str, Any], consumers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"seed": {"listings": list(listings), "consumers": consumers or []}}


def test_seed_listing_defaults_and_values(tmp_path: Path) -> None:
    cfg = load_yaml(tmp_path, seed(
        {"slug": "echo-test", "upstream_url": URL},
        {"slug": "w2", "upstream_url": "https://w.example/mcp", "status": "paused", "transport": "sse",
         "upstream_headers": {"X-Key": "k"}, "free_calls_per_consumer": 3, "rate_limit_per_minute": 5,
         "rate_limit_per_day": 50, "upstream_timeout_seconds": 10, "price_micro_cents": 1000,
         "tool_prices": {"slow": 5000, "free": 0}, "bill_tool_errors": True},
        {"slug": "draft1", "status": "draft"},  # no upstream yet
    ))
    first, second, third = cfg.seed["listings"]
    assert first == {"slug": "echo-test", "status": "live", "transport": "streamable", "upstream_url": URL,
                     "upstream_headers": {}, "tool_prices": {}, "bill_tool_errors": False,
                     "free_calls_per_consumer": 0, "rate_limit_per_minute": None, "rate_limit_per_day": None,
                     "upstream_timeout_seconds": None, "price_micro_cents": None}
    assert second["status"] == "paused" and second["transport"] == "sse"
    assert second["upstream_headers"] == {"X-Key": "k"}
    assert second["tool_prices"] == {"slow": 5000, "free": 0}
    assert (second["free_calls_per_consumer"], second["rate_limit_per_minute"], second["rate_limit_per_day"],
            second["upstream_timeout_seconds"], second["price_micro_cents"]) == (3, 5, 50, 10, 1000)
    assert second["bill_tool_errors"] is True
    assert third["upstream_url"] is None and third["status"] == "draft"


@pytest.mark.parametrize("listing, key", [
    ({"slug": "Bad"}, "slug"),
    ({"slug": "-bad"}, "slug"),
    ({"slug": "bad_slug"}, "slug"),
    ({"slug": "bad slug"}, "slug"),
    ({"slug": "bad/slug"}, "slug"),
    ({"slug": "bad\n"}, "slug"),  # `$` alone would let a trailing newline through
    ({"slug": ""}, "slug"),
    ({"slug": 5}, "slug"),
    ({"upstream_url": URL}, "slug"),  # missing
    ({"slug": "ok", "status": "online"}, "status"),
    ({"slug": "ok", "status": "Live"}, "status"),
    ({"slug": "ok", "transport": "websocket"}, "transport"),
    ({"slug": "ok", "upstream_url": "ftp://x/mcp"}, "upstream_url"),
    ({"slug": "ok", "upstream_url": "localhost:3011/mcp"}, "upstream_url"),
    ({"slug": "ok", "upstream_url": "http://"}, "upstream_url"),
    ({"slug": "ok", "upstream_url": 42}, "upstream_url"),
    ({"slug": "ok", "upstream_url": "http://h:0/mcp"}, "upstream_url"),  # aimed at 80, Host h:0
    ({"slug": "ok", "upstream_url": "http://h:65536/mcp"}, "upstream_url"),
    ({"slug": "ok", "price_micro_cents": -1}, "price_micro_cents"),
    ({"slug": "ok", "price_micro_cents": "cheap"}, "price_micro_cents"),
    ({"slug": "ok", "price_micro_cents": 1.5}, "price_micro_cents"),
    ({"slug": "ok", "tool_prices": {"t": -5}}, "tool_prices.t"),
    ({"slug": "ok", "tool_prices": {"t": None}}, "tool_prices.t"),
    ({"slug": "ok", "tool_prices": [1, 2]}, "tool_prices"),
    ({"slug": "ok", "free_calls_per_consumer": -1}, "free_calls_per_consumer"),
    ({"slug": "ok", "rate_limit_per_minute": "many"}, "rate_limit_per_minute"),
    ({"slug": "ok", "rate_limit_per_day": -2}, "rate_limit_per_day"),
    ({"slug": "ok", "upstream_timeout_seconds": True}, "upstream_timeout_seconds"),
    ({"slug": "ok", "upstream_headers": ["X-Key: k"]}, "upstream_headers"),
    ({"slug": "ok", "upstream_headers": {"X-Port": 8080}}, "upstream_headers"),
    ({"slug": "ok", "bill_tool_errors": "false"}, "bill_tool_errors"),  # a string would be truthy
    ({"slug": "ok", "bill_tool_errors": 1}, "bill_tool_errors"),
    ({"slug": "ok", "price": 1000}, "price"),  # unknown key
])
def test_invalid_listing_names_the_key(tmp_path: Path, listing: dict[str, Any], key: str) -> None:
    message = error(tmp_path, seed(listing))
    assert "seed.listings[" in message and key in message


@pytest.mark.parametrize("url", ["http://user:s3cret@h.example/mcp", "https://user@h.example", "http://:s3cret@[::1]:8080/",
                                 "ftp://user:s3cret@h.example/"])
def test_a_listing_url_with_credentials_is_refused_without_repeating_them(tmp_path: Path, url: str) -> None:
    """As `mcpmeter listing add` refuses it: the gateway would send `user:s3cret@h.example` as the Host."""
    message = error(tmp_path, seed({"slug": "ok", "upstream_url": url}))
    assert "seed.listings[ok].upstream_url" in message and "credentials" in message and "upstream_headers" in message
    assert "s3cret" not in message


def test_invalid_listing_names_its_slug(tmp_path: Path) -> None:
    message = error(tmp_path, seed({"slug": "ok"}, {"slug": "weather", "status": "gone"}))
    assert "seed.listings[weather].status" in message and "gone" in message


def test_duplicate_slugs(tmp_path: Path) -> None:
    assert "each slug may be listed once" in error(tmp_path, seed({"slug": "a"}, {"slug": "a"}))


@pytest.mark.parametrize("raw", [
    "listings",
    ["a"],
    {"listings": 5},
    {"listings": True},
    {"consumers": 5},
    {"listings": ["not a mapping"]},
    {"consumers": ["not a mapping"]},
])
def test_malformed_seed(tmp_path: Path, raw: Any) -> None:
    assert "seed" in error(tmp_path, {"seed": raw})


# --- seed: consumers ----------------------------------------------------------------------------

def test_seed_consumer_defaults_and_values(tmp_path: Path) -> None:
    cfg = load_yaml(tmp_path, seed(consumers=[
        {"key": KEY},
        {"key": "mcpm_live_Other99", "user_id": 7, "project_id": 70, "credit_micro_cents": 1_000_000,
         "status": "suspended", "spending_cap_cents_per_month": 500},
        {"key": "mcpm_test_Third", "user_id": 9},
    ]))
    a, b, c = cfg.seed["consumers"]
    assert a == {"key": KEY, "env": "test", "status": "active", "user_id": 1, "project_id": 1,
                 "credit_micro_cents": 0, "spending_cap_cents_per_month": None}
    assert b == {"key": "mcpm_live_Other99", "env": "live", "status": "suspended", "user_id": 7,
                 "project_id": 70, "credit_micro_cents": 1_000_000, "spending_cap_cents_per_month": 500}
    assert (c["user_id"], c["project_id"]) == (9, 9)  # the project defaults to the user's


@pytest.mark.parametrize("consumer, key", [
    ({}, "key"),
    ({"key": 123}, "key"),
    ({"key": "sk_live_abc"}, "key"),
    ({"key": "mcpm_oauth_abc"}, "key"),  # OAuth tokens are issued, not seeded
    ({"key": "mcpm_test_"}, "key"),
    ({"key": "mcpm_test_abc-def"}, "key"),
    ({"key": "mcpm_TEST_abc"}, "key"),
    ({"key": "Bearer mcpm_test_abc"}, "key"),
    ({"key": " mcpm_test_abc"}, "key"),  # would be stored with the space and never match
    ({"key": "mcpm_test_abc\n"}, "key"),
    ({"key": KEY, "status": "banned"}, "status"),
    ({"key": KEY, "credit_micro_cents": -1}, "credit_micro_cents"),
    ({"key": KEY, "credit_micro_cents": "lots"}, "credit_micro_cents"),
    ({"key": KEY, "user_id": -1}, "user_id"),
    ({"key": KEY, "project_id": "p1"}, "project_id"),
    ({"key": KEY, "spending_cap_cents_per_month": -100}, "spending_cap_cents_per_month"),
    ({"key": KEY, "credit": 5}, "credit"),  # unknown key
])
def test_invalid_consumer_names_the_key(tmp_path: Path, consumer: dict[str, Any], key: str) -> None:
    message = error(tmp_path, seed(consumers=[consumer]))
    assert "seed.consumers[0]" in message and key in message


# --- allowed_origins (issue 7) ---------------------------------------------------------------------

def test_allowed_origins_from_yaml_and_environment(tmp_path: Path) -> None:
    assert load(None, environ=NO_ENV).allowed_origins == ()
    cfg = load_yaml(tmp_path, {"allowed_origins": ["https://App.example:443", "http://localhost:6274"]})
    assert cfg.allowed_origins == ("https://app.example", "http://localhost:6274")
    cfg = load_yaml(tmp_path, {"allowed_origins": ["https://a.example"]},
                    {"MCPMETER_ALLOWED_ORIGINS": " https://b.example , http://c.example:8080,"})
    assert cfg.allowed_origins == ("https://b.example", "http://c.example:8080")


@pytest.mark.parametrize("value", ["https://a.example/path", ["null"], ["a.example"], [1], {"a": 1},
                                   ["https://u@a.example"], ["ftp://a.example"]])
def test_bad_allowed_origins_name_the_key(tmp_path: Path, value: Any) -> None:
    assert "allowed_origins" in error(tmp_path, {"allowed_origins": value})


# --- issue 9: ${VARS} in the YAML, shadow mode, authorization servers ---------------------------


def test_environment_variables_expand_in_the_yaml(tmp_path: Path) -> None:
    data = {"seed": {"listings": [{"slug": "echo", "upstream_url": "http://127.0.0.1:${DEMOS_PORT:-3011}/mcp"},
                                  {"slug": "two", "upstream_url": "http://${HOST}:1/mcp"}]}}
    cfg = load_yaml(tmp_path, data, {"DEMOS_PORT": "4011", "HOST": "h.example"})
    assert [x["upstream_url"] for x in cfg.seed["listings"]] == ["http://127.0.0.1:4011/mcp", "http://h.example:1/mcp"]
    cfg = load_yaml(tmp_path, {**data, "seed": {"listings": data["seed"]["listings"][:1]}})
    assert cfg.seed["listings"][0]["upstream_url"] == "http://127.0.0.1:3011/mcp"  # the default
    assert "HOST is not set" in error(tmp_path, data)


def test_shadow_settings(tmp_path: Path) -> None:
    assert load(None, environ=NO_ENV).shadow is False
    assert load(None, environ={"MCPMETER_SHADOW": "1"}).shadow is True
    assert load(None, environ={"MCPMETER_SHADOW": "false"}).shadow is False
    assert "shadow must be true or false" in env_error({"MCPMETER_SHADOW": "maybe"})
    assert load_yaml(tmp_path, {"shadow": True}).shadow is True
    assert load_yaml(tmp_path, {"shadow_listings": ["echo-test"]}).shadow_listings == ("echo-test",)
    assert load(None, environ={"MCPMETER_SHADOW_LISTINGS": "a, b"}).shadow_listings == ("a", "b")
    assert "not a listing slug" in error(tmp_path, {"shadow_listings": ["Bad Slug"]})
    assert "list of strings" in error(tmp_path, {"shadow_listings": "echo-test"})


def test_authorization_servers(tmp_path: Path) -> None:
    assert load(None, environ=NO_ENV).authorization_servers == ()
    cfg = load_yaml(tmp_path, {"authorization_servers": ["https://auth.example/"]})
    assert cfg.authorization_servers == ("https://auth.example",)
    assert "http:// or https://" in error(tmp_path, {"authorization_servers": ["auth.example"]})


def test_held_call_limits_are_validated(tmp_path: Path) -> None:
    cfg = load_yaml(tmp_path, {})
    assert (cfg.task_settle_seconds, cfg.round_settle_seconds) == (3600.0, 900.0)
    assert load_yaml(tmp_path, {"task_settle_seconds": 7200, "round_settle_seconds": 301}).task_settle_seconds == 7200
    for key in ("task_settle_seconds", "round_settle_seconds"):
        for bad in (0, -5, 300, 31 * 86400):  # 300 s is the default longest upstream timeout
            assert key in error(tmp_path, {key: bad})
        assert key in error(tmp_path, {key: "soon"})


@pytest.mark.parametrize("value", [-1, 3601])
def test_upstream_idle_seconds_is_bounded(tmp_path: Path, value: float) -> None:
    assert "upstream_idle_seconds must be between 0 and 3600" in error(tmp_path, {"upstream_idle_seconds": value})
    assert load_yaml(tmp_path, {"upstream_idle_seconds": 0}).upstream_idle_seconds == 0


def test_the_bounds_of_all_bodies_being_read_follow_a_large_max_body_bytes_unless_set(tmp_path: Path) -> None:
    """max_reading_bytes and max_holding_bytes came after max_body_bytes: a file that raised max_body_bytes
    past 256 MiB was valid before them, and must not stop the gateway from starting after an upgrade.
    Unset, they are at least what one body, or one answer held whole, may be; set, they are checked."""
    big = 300 * 1024 * 1024
    cfg = load_yaml(tmp_path, {"max_body_bytes": big})
    assert (cfg.max_reading_bytes, cfg.max_holding_bytes) == (big, 4 * big)
    assert (load(None, environ=NO_ENV).max_reading_bytes, load(None, environ=NO_ENV).max_holding_bytes) == (
        256 * 1024 * 1024, 1024 * 1024 * 1024)  # the defaults, for the default max_body_bytes
    assert "max_reading_bytes" in error(tmp_path, {"max_body_bytes": big, "max_reading_bytes": big - 1})
    assert "max_holding_bytes" in error(tmp_path, {"max_body_bytes": big, "max_holding_bytes": 4 * big - 1})
    assert "max_reading_bytes must be positive" in error(tmp_path, {"max_reading_bytes": 0})


ON = {"store": "mysql", "cache": "redis", "wallets": True}


@pytest.mark.parametrize(("data", "env", "error"), [
    ({"wallets": True}, {}, "wallets: true needs store: mysql and cache: redis"),
    ({"wallets": True, "store": "mysql"}, {}, "wallets: true needs store: mysql and cache: redis"),
    ({}, {"MCPMETER_WALLETS": "1", "MCPMETER_STORE": "mysql"}, "wallets: true needs"),
    ({**ON, "wallet_calls": 0}, {}, "wallet_calls must be between"),
    ({**ON, "wallet_seconds": 0.5}, {}, "wallet_seconds must be between"),
    ({"redis": {"prefix": "a{b}:"}}, {}, "redis.prefix must not hold { or }"),
    ({"wallets": "yes please"}, {}, "wallets"),
])
def test_wallet_settings_are_checked(tmp_path: Path, data: dict[str, Any], env: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("{", r"\{").replace("}", r"\}")):
        load_yaml(tmp_path, data, env)


def test_wallets_on_from_the_environment(tmp_path: Path) -> None:
    c = load_yaml(tmp_path, {}, {"MCPMETER_WALLETS": "1", "MCPMETER_STORE": "mysql", "MCPMETER_CACHE": "redis"})
    assert c.wallets and c.wallet_calls == 1000 and c.wallet_seconds == 60.0
    assert not load_yaml(tmp_path, {}).wallets

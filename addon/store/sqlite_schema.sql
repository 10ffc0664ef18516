-- The embedded store: the reference tables' columns that the gateway reads and writes, in SQLite,
-- plus the meter's own tables (mcpmeter_*). Mirrors schema.sql (MySQL) so both backends behave alike.
CREATE TABLE IF NOT EXISTS users (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL DEFAULT '',
  email TEXT,
  password TEXT NOT NULL DEFAULT '',
  role TEXT NOT NULL DEFAULT 'consumer',
  status TEXT NOT NULL DEFAULT 'active',
  credit_micro_cents INTEGER NOT NULL DEFAULT 0,
  created_at TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS projects (
  id INTEGER PRIMARY KEY,
  user_id INTEGER NOT NULL REFERENCES users(id),
  name TEXT NOT NULL DEFAULT '',
  slug TEXT UNIQUE,
  spending_cap_cents_per_month INTEGER,
  created_at TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS api_keys (
  id INTEGER PRIMARY KEY,
  user_id INTEGER NOT NULL REFERENCES users(id),
  project_id INTEGER NOT NULL REFERENCES projects(id),
  name TEXT,
  key_prefix TEXT NOT NULL,
  key_hash TEXT NOT NULL UNIQUE,
  env TEXT NOT NULL DEFAULT 'live',
  last_used_at TEXT, revoked_at TEXT, created_at TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS oauth_clients (
  id INTEGER PRIMARY KEY,
  client_id TEXT NOT NULL UNIQUE,
  name TEXT NOT NULL DEFAULT '',
  redirect_uris TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS oauth_access_tokens (
  id INTEGER PRIMARY KEY,
  token_hash TEXT NOT NULL UNIQUE,
  token_prefix TEXT NOT NULL,
  user_id INTEGER NOT NULL REFERENCES users(id),
  client_id INTEGER NOT NULL,
  scopes TEXT NOT NULL DEFAULT '[]',
  expires_at TEXT NOT NULL,
  revoked_at TEXT, last_used_at TEXT, created_at TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS mcps (
  id INTEGER PRIMARY KEY,
  publisher_id INTEGER NOT NULL DEFAULT 0,
  slug TEXT NOT NULL UNIQUE,
  name TEXT NOT NULL DEFAULT '',
  category TEXT NOT NULL DEFAULT '',
  upstream_url TEXT,
  upstream_headers TEXT,
  transport TEXT NOT NULL DEFAULT 'streamable',
  status TEXT NOT NULL DEFAULT 'draft',
  last_seen_at TEXT,
  last_status_code INTEGER,
  consecutive_failures INTEGER NOT NULL DEFAULT 0,
  free_calls_per_consumer INTEGER NOT NULL DEFAULT 0,
  rate_limit_per_minute INTEGER,
  rate_limit_per_day INTEGER,
  upstream_timeout_seconds INTEGER,
  bill_tool_errors INTEGER NOT NULL DEFAULT 0,
  created_at TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS mcp_tools (
  id INTEGER PRIMARY KEY,
  mcp_id INTEGER NOT NULL REFERENCES mcps(id),
  name TEXT NOT NULL,
  description TEXT,
  UNIQUE (mcp_id, name)
);
CREATE TABLE IF NOT EXISTS pricing_rules (
  id INTEGER PRIMARY KEY,
  mcp_id INTEGER NOT NULL REFERENCES mcps(id),
  tool_name TEXT,
  model TEXT NOT NULL DEFAULT 'per_call',
  price_micro_cents INTEGER NOT NULL DEFAULT 0,
  created_at TEXT, updated_at TEXT
);
-- SQLite treats NULLs as distinct in UNIQUE, so the listing default (tool_name NULL) gets its own index.
CREATE UNIQUE INDEX IF NOT EXISTS pricing_rules_mcp_id_tool_name_unique ON pricing_rules (mcp_id, IFNULL(tool_name, char(0)));
CREATE TABLE IF NOT EXISTS usage_events (
  id INTEGER PRIMARY KEY,
  project_id INTEGER NOT NULL,
  mcp_id INTEGER NOT NULL,
  api_key_id INTEGER,
  tool_name TEXT NOT NULL,
  client TEXT,
  user_agent TEXT,
  called_at TEXT NOT NULL,
  duration_ms INTEGER NOT NULL,
  status INTEGER NOT NULL,
  billed_micro_cents INTEGER NOT NULL DEFAULT 0,
  publisher_payout_micro_cents INTEGER NOT NULL DEFAULT 0,
  platform_fee_micro_cents INTEGER NOT NULL DEFAULT 0,
  request_id TEXT UNIQUE,
  aggregated_at TEXT, created_at TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS credit_transactions (
  id INTEGER PRIMARY KEY,
  user_id INTEGER NOT NULL REFERENCES users(id),
  amount_micro_cents INTEGER NOT NULL,
  type TEXT NOT NULL,
  reference_type TEXT,
  reference_id INTEGER,
  balance_after_micro_cents INTEGER NOT NULL,
  description TEXT,
  metadata TEXT,
  request_id TEXT,
  created_at TEXT, updated_at TEXT,
  UNIQUE (request_id, type)
);
CREATE INDEX IF NOT EXISTS credit_transactions_user_id ON credit_transactions (user_id);
CREATE TABLE IF NOT EXISTS mcp_consumer_usage (
  id INTEGER PRIMARY KEY,
  mcp_id INTEGER NOT NULL,
  user_id INTEGER NOT NULL,
  free_calls_used INTEGER NOT NULL DEFAULT 0,
  period_year_month TEXT,
  billable_calls INTEGER NOT NULL DEFAULT 0,
  first_called_at TEXT, last_called_at TEXT, created_at TEXT, updated_at TEXT,
  UNIQUE (mcp_id, user_id)
);
CREATE TABLE IF NOT EXISTS mcpmeter_calls (
  request_id TEXT PRIMARY KEY,
  user_id INTEGER NOT NULL,
  project_id INTEGER NOT NULL,
  mcp_id INTEGER NOT NULL,
  tool_name TEXT NOT NULL,
  verdict TEXT NOT NULL,
  amount_micro_cents INTEGER NOT NULL,
  period_year_month TEXT NOT NULL,
  status INTEGER,
  refunded INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  settled_at TEXT,
  reason TEXT
);
CREATE TABLE IF NOT EXISTS mcpmeter_project_spend (
  project_id INTEGER NOT NULL,
  period_year_month TEXT NOT NULL,
  spent_micro_cents INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (project_id, period_year_month)
);

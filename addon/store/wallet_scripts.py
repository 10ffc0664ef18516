"""The wallets' Lua scripts and key layout (addon/store/wallets.py).

A wallet is one Redis hash per (consumer, project): the hold it spends from (a row of
`mcpmeter_holds`, committed in MySQL before the wallet was funded), what is left of it, the month it
counts in, when it goes stale (unix seconds) and the consumer's balance in MySQL when it was funded
(for X-Mcpmeter-Balance). Every key of one consumer carries the hash tag `{u<user id>}`, so the keys a
script touches together live in one slot and the gateway runs unchanged on Redis Cluster.

Each script is atomic: a spend never takes a wallet below zero whatever the number of gateways, and a
retired wallet is gone for every gateway at once (nobody spends from it after its rest was counted).
"""

from __future__ import annotations

import hashlib

from ..cache.redis import GCRA_LUA

# spend(wallet, price, now (unix s), month) -> {1, hold, left, rest} or {0} (no wallet, stale, another
# month, or too little left: the caller asks MySQL for a new hold). Amounts stay Redis's 64-bit
# integers and strings: a Lua number is a double, inexact past 2**53 µ¢.
_SPEND_LUA = """
local function spend(key, price, now, month)
  local w = redis.call('HMGET', key, 'hold', 'period', 'until', 'rest')
  if not w[1] or w[2] ~= month or tonumber(w[3]) <= tonumber(now) then return {0} end
  if redis.call('HINCRBY', key, 'left', '-' .. price) < 0 then
    redis.call('HINCRBY', key, 'left', price)
    return {0}
  end
  return {1, w[1], redis.call('HGET', key, 'left'), w[4]}
end
"""

# KEYS[1] wallet. ARGV: price, now (unix s), month. -> spend's reply.
SPEND = _SPEND_LUA + "return spend(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\n"

# The rate limit and the spend of one call in one round trip (wallets.charge_limited): the rate
# limit's GCRA over KEYS[1..n] with its ARGV[1..3n+1] (addon/cache/redis.py), then, only if the call
# is allowed, spend from the wallet KEYS[n+1] with the three ARGV after them. The rate keys carry the
# wallet's hash tag `{u<user id>}` (redis.rate_keys): one slot. -> the rate limit's reply followed by
# spend's when allowed. A call counted whose wallet cannot pay stays counted, as when the rate limit
# was judged before a charge refused it.
RATE_SPEND = "local n = #KEYS - 1\n" + GCRA_LUA + _SPEND_LUA + """
if out[1] == 1 then
  local a = 3 * n + 2
  for _, v in ipairs(spend(KEYS[n + 1], ARGV[a], ARGV[a + 1], ARGV[a + 2])) do out[#out + 1] = v end
end
return out
"""

# KEYS[1] wallet. ARGV: the hold to retire, or '' for whichever is there. -> {hold, left} or {} (none, or
# another hold's). The wallet is deleted: no gateway spends from it again; `left` goes back in MySQL.
RETIRE = """
local w = redis.call('HMGET', KEYS[1], 'hold', 'left')
if not w[1] or (ARGV[1] ~= '' and w[1] ~= ARGV[1]) then return {} end
redis.call('DEL', KEYS[1])
return {w[1], w[2]}
"""

# KEYS[1] wallet. ARGV: price, now (unix s), month. -> {1, hold, left, rest} paid from the wallet there
# (another gateway's grant funded it since this one's SPEND), {2, hold, left} retired as RETIRE does (it
# cannot pay this call: stale, another month, too little left), or {0} (none). A grant starts with it:
# a wallet that can pay is never retired, so gateways granting at once do not retire each other's.
TAKE = """
local w = redis.call('HMGET', KEYS[1], 'hold', 'period', 'until', 'rest')
if not w[1] then return {0} end
if w[2] == ARGV[3] and tonumber(w[3]) > tonumber(ARGV[2]) then
  if redis.call('HINCRBY', KEYS[1], 'left', '-' .. ARGV[1]) >= 0 then
    return {1, w[1], redis.call('HGET', KEYS[1], 'left'), w[4]}
  end
  redis.call('HINCRBY', KEYS[1], 'left', ARGV[1])
end
local left = redis.call('HGET', KEYS[1], 'left')
redis.call('DEL', KEYS[1])
return {2, w[1], left}
"""

# KEYS[1] wallet. ARGV: hold, granted, month, until, rest, ttl (ms), price of the call that asked.
# -> {1, left, rest} funded with that call paid, or {0} when a wallet is there already (another
# gateway's grant won: this hold goes back whole, and the call spends from that wallet).
FUND = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
redis.call('HSET', KEYS[1], 'hold', ARGV[1], 'left', ARGV[2], 'period', ARGV[3], 'until', ARGV[4], 'rest', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'left', '-' .. ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {1, redis.call('HGET', KEYS[1], 'left'), ARGV[5]}
"""

# KEYS[1] wallet. ARGV: hold, amount refunded. -> {left, rest}, or {} when the wallet holds another hold
# (or none). A refund goes back to the balance in MySQL (wallet_sql.record), which the wallet's `rest`
# mirrors for X-Mcpmeter-Balance: without this, later answers showed the balance short of it.
REFUNDED = """
if redis.call('HGET', KEYS[1], 'hold') ~= ARGV[1] then return {} end
local rest = redis.call('HINCRBY', KEYS[1], 'rest', ARGV[2])
return {redis.call('HGET', KEYS[1], 'left'), tostring(rest)}
"""


def sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def wallet_key(prefix: str, user_id: int, project_id: int) -> str:
    """One consumer's wallet for one project, under the consumer's hash tag."""
    return f"{prefix}w:{{u{user_id}}}:p{project_id}"

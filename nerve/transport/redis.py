"""``redis://host:6379/0``: Redis as a broker.

Design (docs/brokers/redis.md): an unordered function (``ordered=False``) reads its
own stream, ``<base>:s``, through the consumer group ``n``: ``XREADGROUP`` hands
entries out, ``XACK`` + ``XDEL`` settle them, no script on that hot path; a lease is
the pending entry, fenced by its owner and delivery count (``StreamDelivery``), and a
script run every ``poll_interval`` moves due retries in and takes over expired leases.
An ordered function needs one delivery per partition key at a time, which a stream
cannot give; its state changes are Lua scripts. Each consumer group has its own keys under
``<prefix>:g:<len>:<group>``: ``:body`` and ``:meta`` hashes (entry id -> raw event,
``attempt|token|first_ms|=key``), a ``:due`` sorted set (entries waiting to be handed
out, scored by the server time in ms they become available), a ``:lease`` sorted set
(entries handed out, scored by their lease deadline) and, for ordered groups, one
``:kq:<key>`` list per partition key whose head is the only entry of that key in
``:due`` or ``:lease``. Publishing fans out in one script that appends each event to
every matching group (the routing is computed here from the ``<prefix>:groups``
registry and the script refuses it if the registry changed meanwhile) and to the
capped ``<prefix>:log`` stream. A claim moves entries to ``:lease`` with a fresh
random token; ack, nack, extend and dead-letter succeed only while the token
matches, so a consumer whose lease was taken over is fenced off. The scripts use
the server's clock, so clients with skewed clocks agree on leases. A consumer with
nothing to claim waits in Redis (``BLPOP`` on its group's ``:wake`` list, the claim
script pipelined behind it); scripts that make entries due push a token there, and
the Pub/Sub channel ``<prefix>:wake`` announces retries due later.

URL options: ``?prefix=nerve&visibility_timeout=30&max_payload=1048576
&poll_interval=1.0&log_max=10000&ingest=false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from nerve import event as codec
from nerve._batch import Coalescer
from nerve._urls import redact as _redact
from nerve.app import Subscription
from nerve.errors import (
    BrokerUnavailable,
    ConfigError,
    InvalidEvent,
    LeaseLost,
    NerveError,
    PayloadTooLarge,
    TransportError,
)
from nerve.event import Event
from nerve.transport.base import (
    DeadLetterEntry,
    Delivery,
    Failure,
    Features,
    GroupStats,
    encode_checked,
)

_PUBLISHES_AT_ONCE = 32
"""Publish scripts one transport runs at once; more concurrent publishes wait their
turn. redis-py opens a connection per command in flight: 3,000 concurrent publishes
opened connections until the server refused them ("Too many connections")."""

_NEVER = 3600.0
"""Seconds "nothing is pending" stands for (a fetch still looks every poll_interval)."""

_INGEST_BLOCK = 0.25
"""Seconds one read of the ingest stream blocks (bounds how long close() waits)."""

_KNOWN = ("prefix", "visibility_timeout", "max_payload", "poll_interval", "log_max", "ingest")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    connection_url: str = "redis://127.0.0.1:6379/0"
    """The URL handed to redis-py (nerve's options removed)."""
    host: str = "127.0.0.1"
    port: int = 6379
    prefix: str = "nerve"
    visibility_timeout: float = 30.0
    max_payload: int = 1024 * 1024
    poll_interval: float = 1.0
    """Longest a waiting fetch sleeps without a wake-up before it looks again."""
    log_max: int = 10_000
    """Approximate length of the ``<prefix>:log`` stream (0: no log)."""
    ingest: bool = False
    """Route events that other programs XADD to ``<prefix>:ingest`` (field ``event``:
    a structured CloudEvents JSON document) to the matching groups."""

    @classmethod
    def from_url(cls, url: str) -> RedisConfig:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ConfigError(f"not a redis URL: {_redact(url)!r}")
        try:
            host = parts.hostname or "127.0.0.1"
            port = parts.port or 6379
        except ValueError as exc:
            raise ConfigError(f"{_redact(url)!r}: {exc}") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigError(
                f"{_redact(url)!r}: the path is the database number, e.g. redis://host:6379/0"
            )
        options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(options) - set(_KNOWN)
        if unknown:
            raise ConfigError(
                f"{_redact(url)!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(_KNOWN)}"
            )
        try:
            config = cls(
                connection_url=urlunsplit(("redis", parts.netloc, f"/{db or 0}", "", "")),
                host=host,
                port=port,
                prefix=options.get("prefix", "nerve"),
                visibility_timeout=float(options.get("visibility_timeout", 30.0)),
                max_payload=int(options.get("max_payload", 1024 * 1024)),
                poll_interval=float(options.get("poll_interval", 1.0)),
                log_max=int(options.get("log_max", 10_000)),
                ingest=_flag(options.get("ingest", "false")),
            )
        except ValueError as exc:
            raise ConfigError(f"{_redact(url)!r}: {exc}") from None
        if not config.prefix:
            raise ConfigError(f"{_redact(url)!r}: prefix must not be empty")
        if not config.visibility_timeout > 0 or not config.poll_interval > 0:
            raise ConfigError(f"{_redact(url)!r}: visibility_timeout and poll_interval must be > 0")
        if not 1024 <= config.max_payload <= 512 * 1024 * 1024:
            raise ConfigError(f"{_redact(url)!r}: max_payload must be 1024 .. 536870912 bytes")
        if config.log_max < 0:
            raise ConfigError(f"{_redact(url)!r}: log_max must be >= 0")
        return config


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"ingest must be true or false, not {value!r}")


def _base(prefix: str, group: str) -> str:
    """The key prefix of one group (its length makes group/suffix boundaries unambiguous)."""
    return f"{prefix}:g:{len(group.encode())}:{group}"


# -- Lua ---------------------------------------------------------------------------------

_PRELUDE = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function gbase(g) return P .. ':g:' .. string.len(g) .. ':' .. g end
-- an entry's meta, 'attempt|token|first_ms|key': all four fields, or only those a
-- claim (attempt, first_ms, key) or a settlement (token, key) reads (each capture is
-- a new Lua string, hashed byte by byte)
local function parse(m)
  return string.match(m, '^(%d+)|([^|]*)|([^|]*)|(.*)$')
end
local function parse_for_claim(m)
  return string.match(m, '^(%d+)|[^|]*|([^|]*)|(.*)$')
end
local function parse_for_settle(m)
  return string.match(m, '^%d+|([^|]*)|[^|]*|(.*)$')
end
-- variadic calls over a list, at most 1,000 arguments a call (Lua's unpack has limits)
local function vcall(cmd, key, items)
  local n, i = #items, 1
  while i <= n do
    local j = math.min(n, i + 999)
    redis.call(cmd, key, unpack(items, i, j))
    i = j + 1
  end
end
local function vget(cmd, key, items)
  local out, n, i = {}, #items, 1
  while i <= n do
    local j = math.min(n, i + 999)
    local got = redis.call(cmd, key, unpack(items, i, j))
    for x = 1, j - i + 1 do out[#out + 1] = got[x] end
    i = j + 1
  end
  return out
end
-- Every queue's sorted sets and hashes hold PIN: a member no entry id or ordering key
-- can equal (they never hold a TAB), longer than what Redis keeps in a listpack (64
-- bytes by default), so Redis stores them as skiplists and hash tables at every size.
-- As listpacks (below 128 members) each lookup, insert and delete scans the key, and
-- a queue its consumers keep up with stays that small: 1.5x the server's CPU an event.
-- The sets' PIN scores +inf: no range of due or expired entries reaches it.
local PIN = '\tnerve keeps this member so that Redis stores this key as a hash table at any size'
local function pin_set(key) redis.call('ZADD', key, '+inf', PIN) end
local function pin_hash(key) redis.call('HSET', key, PIN, '') end
-- numbers go to redis.call as strings: Redis 7.0 formats a Lua number argument with
-- snprintf("%.17g"), and Lua a concatenated one with "%.14g", both slow float paths
local function int(n) return string.format('%d', n) end
-- ordered functions: '<base>:kh' maps a partition key to the entry whose turn it is,
-- with '+' appended while later entries of the key wait in the key's ':kq:<key>' list.
-- The end of a keyed event, when the turn was not simply freed (settle frees the
-- common case, an event whose key has no later entry, in one HDEL for its batch): pass
-- the turn to the key's next entry and make it due
local function pass_key(base, dz, id, k, nows)
  local kk = string.sub(k, 2)
  local kh, kq = base .. ':kh', base .. ':kq:' .. kk
  local head = redis.call('HGET', kh, kk)
  if head == id then
    redis.call('HDEL', kh, kk)
    return false
  end
  if head ~= id .. '+' then
    -- not this key's turn; or a queue of the earlier layout (no turn recorded, the
    -- list's head is the turn): its next entry takes the turn
    redis.call('LREM', kq, 1, id)
    if head then return false end
  end
  local nxt = redis.call('LPOP', kq)
  if not nxt then
    redis.call('HDEL', kh, kk)
    return false
  end
  if redis.call('LLEN', kq) > 0 then
    redis.call('HSET', kh, kk, nxt .. '+')
  else
    redis.call('HSET', kh, kk, nxt)
  end
  redis.call('ZADD', dz, nows, nxt)
  return true
end
-- a stream entry's fields (name, value, ...): its raw event, the attempts made before
-- the entry (0 if none) and the first attempt's ms ('' if none)
local function entry_fields(fields)
  local body, a, f = nil, 0, ''
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name == 'b' then body = fields[j + 1]
    elseif name == 'a' then a = tonumber(fields[j + 1])
    elseif name == 'f' then f = fields[j + 1] end
  end
  return body, a, f
end
-- keep a raw event of function g (keys at base) as a dead letter with its failure JSON
local function dead_letter(base, g, body, failure, nows)
  local dl = redis.call('INCR', P .. ':dl:seq')
  redis.call('HSET', P .. ':dl:' .. dl, 'g', g, 'b', body, 'f', failure, 't', nows)
  redis.call('ZADD', P .. ':dl', dl, dl)
  redis.call('ZADD', base .. ':dl', dl, dl)
  redis.call('HINCRBY', base .. ':cnt', 'dead_lettered', 1)
end
-- wake a consumer of the group at base: a token in its wake list, where waiting consumers
-- block (BLPOP, followed by a claim in the same round trip); a few tokens at most
local function wake(base)
  redis.call('LPUSH', base .. ':wake', '1')
  redis.call('LTRIM', base .. ':wake', '0', '15')
end
-- event positions: read once per script, advanced here, written back by flush()
local seq = nil
local logged = {}
local function append(body)
  if seq == nil then seq = tonumber(redis.call('GET', P .. ':seq') or '0') end
  seq = seq + 1
  local id, n = string.format('%016d', seq), #logged
  logged[n + 1], logged[n + 2] = id, body
  return id
end
-- the log: one stream entry per script (per 500 events), its fields position (the
-- entry id, zero-padded) -> body, its id the last position (so the entries holding
-- positions after p are those after id p-1); trimmed to about logmax events
local function write_log(logmax)
  if logmax == '0' or #logged == 0 then return end
  local first = seq - #logged / 2 + 1
  local minid = string.format('%d-0', math.max(0, seq - tonumber(logmax)))
  local i = 1
  while i <= #logged do
    local j = math.min(#logged, i + 999)
    local id = string.format('%d-1', first + j / 2 - 1)
    redis.call('XADD', P .. ':log', 'MINID', '~', minid, id, unpack(logged, i, j))
    i = j + 1
  end
end
-- an event entering function g's queue, gathered per function (per) for flush(); for
-- an ordered function (k: '=' and the key) flush() decides which entries are due
local function stage(per, g, id, body, k, nows)
  local q = per[g]
  if not q then
    q = {base = gbase(g), b = {}, m = {}, d = {}, k = {}}
    per[g] = q
  end
  if k == '*' then
    -- an unordered function: its stream (its consumer group hands the entry out)
    if not q.s then q.s = q.base .. ':s' end
    redis.call('XADD', q.s, '*', 'b', body)
    return
  end
  local nb = #q.b
  q.b[nb + 1], q.b[nb + 2] = id, body
  q.m[nb + 1], q.m[nb + 2] = id, '0|||' .. k
  if k == '' then
    local nd = #q.d
    q.d[nd + 1], q.d[nd + 2] = nows, id
  else
    local nk = #q.k
    q.k[nk + 1], q.k[nk + 2] = string.sub(k, 2), id
  end
end
-- the keyed entries of q: an entry whose key has no turn holder takes the turn and is
-- due; the others wait in their key's list (one HMGET and one HSET for the batch)
local function queue_keyed(q, nows)
  local kh, keys = q.base .. ':kh', {}
  for j = 1, #q.k, 2 do keys[#keys + 1] = q.k[j] end
  local held = vget('HMGET', kh, keys)
  local turns = {}  -- every key of the batch -> its turn's new value
  for j = 1, #q.k, 2 do
    local kk, id = q.k[j], q.k[j + 1]
    local h = turns[kk] or held[(j + 1) / 2]
    if not h then
      turns[kk] = id
      local nd = #q.d
      q.d[nd + 1], q.d[nd + 2] = nows, id
    else
      redis.call('RPUSH', q.base .. ':kq:' .. kk, id)
      if string.sub(h, -1) ~= '+' then turns[kk] = h .. '+' else turns[kk] = h end
    end
  end
  local set = {}
  for kk, turn in pairs(turns) do
    set[#set + 1] = kk
    set[#set + 1] = turn
  end
  vcall('HSET', kh, set)
end
-- write what stage() gathered for an ordered function's queue (one variadic call per
-- key) and wake its consumers
local function flush_queue(q, nows)
  pin_set(q.base .. ':due')
  pin_hash(q.base .. ':meta')
  if #q.k > 0 then
    pin_hash(q.base .. ':kh')
    queue_keyed(q, nows)
  end
  vcall('HSET', q.base .. ':body', q.b)
  vcall('HSET', q.base .. ':meta', q.m)
  if #q.d > 0 then vcall('ZADD', q.base .. ':due', q.d) end
  wake(q.base)
end
local function flush(per, nows, logmax)
  if seq ~= nil then redis.call('SET', P .. ':seq', int(seq)) end
  write_log(logmax)
  for _, q in pairs(per) do
    if #q.b > 0 then flush_queue(q, nows) end
  end
end
"""

# ARGV: P, version, logmax, n, routes, then the n bodies. ``routes`` holds a line per
# event (each ended by a newline): ingest id ('' if none), then TAB group TAB keyenc per
# target group (keyenc: ``_keyenc``, which escapes TAB, newline and %). An event read
# from the ingest stream is routed only if this script is the one that acknowledges it
# there (exactly one fan-out). One routing argument per batch, not five per event:
# redis-py packs every argument in Python.
_PUBLISH = (
    _PRELUDE
    + """
if (redis.call('GET', P .. ':groups:version') or '0') ~= ARGV[2] then return -1 end
local nows = int(now_ms())
local logmax = ARGV[3]
local i = 6
local per = {}
local routes, pos = ARGV[5], 1
local find, sub = string.find, string.sub
while pos <= string.len(routes) do
  local body = ARGV[i]
  i = i + 1
  local nl = find(routes, '\\n', pos, true)
  local at = find(routes, '\\t', pos, true)
  if not at or at > nl then at = nl end
  local iid = sub(routes, pos, at - 1)
  pos = nl + 1
  if iid == '' or redis.call('XACK', P .. ':ingest', 'nerve', iid) == 1 then
    if iid ~= '' then redis.call('XDEL', P .. ':ingest', iid) end
    local id = append(body)
    while at < nl do
      local gt = find(routes, '\\t', at + 1, true)
      local kt = find(routes, '\\t', gt + 1, true)
      if not kt or kt > nl then kt = nl end
      local g, k = sub(routes, at + 1, gt - 1), sub(routes, gt + 1, kt - 1)
      at = kt
      stage(per, g, id, body, k, nows)
    end
  end
end
flush(per, nows, logmax)
return 1
"""
)

# ARGV: P, group, limit, lease_ms, token, stop key ('' for none)
# -> {id, body, attempt, first_ms, id, body, ...} (flat: no table per entry), wait_ms:
# ms until an entry may be claimable (0: more are due now, -1: nothing is pending, -2:
# the group is not declared, -3: the consumer was closed while it waited, nothing was
# claimed)
_CLAIM = (
    _PRELUDE
    + """
local stop = ARGV[6]
if stop and stop ~= '' and redis.call('DEL', stop) == 1 then return {{}, -3} end
local base = gbase(ARGV[2])
local limit, lease, token = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local dz, lz, meta, bodies = base .. ':due', base .. ':lease', base .. ':meta', base .. ':body'
local now = now_ms()
local nows = int(now)
local ids = redis.call('ZRANGEBYSCORE', lz, '-inf', nows, 'LIMIT', '0', ARGV[3])
local expired = #ids
if #ids < limit then
  local more = redis.call('ZRANGEBYSCORE', dz, '-inf', nows, 'LIMIT', '0', int(limit - #ids))
  for _, id in ipairs(more) do ids[#ids + 1] = id end
end
local out = {}
-- everything due is taken: the group's wake tokens are spent (left when there is more)
if #ids < limit then redis.call('DEL', base .. ':wake') end
if #ids > 0 then
  local ms = vget('HMGET', meta, ids)
  local bs = vget('HMGET', bodies, ids)
  if #ids > expired then vcall('ZREM', dz, {unpack(ids, expired + 1)}) end
  local mset, zset, gone = {}, {}, {}
  local deadline = int(now + lease)
  for j, id in ipairs(ids) do
    local m, body = ms[j], bs[j]
    if m and body then
      local a, first, k = parse_for_claim(m)
      a = tonumber(a) + 1
      if first == '' then first = nows end
      mset[#mset + 1] = id
      mset[#mset + 1] = string.format('%d|%s|%s|%s', a, token, first, k)
      zset[#zset + 1] = deadline
      zset[#zset + 1] = id
      local n = #out
      out[n + 1], out[n + 2], out[n + 3], out[n + 4] = id, body, a, first
    else
      gone[#gone + 1] = id
    end
  end
  if #mset > 0 then
    vcall('HSET', meta, mset)
    pin_set(lz)
    vcall('ZADD', lz, zset)
  end
  if #gone > 0 then vcall('ZREM', lz, gone) end
end
-- ms until an entry may be claimable: 0 when more were due than taken, -1 for never
local wait = 0
if #ids < limit then
  wait = -1
  local d = redis.call('ZRANGEBYSCORE', dz, '-inf', '(+inf', 'LIMIT', '0', '1', 'WITHSCORES')
  local l = redis.call('ZRANGEBYSCORE', lz, '-inf', '(+inf', 'LIMIT', '0', '1', 'WITHSCORES')
  local nxt = nil
  if d[2] then nxt = tonumber(d[2]) end
  if l[2] and (nxt == nil or tonumber(l[2]) < nxt) then nxt = tonumber(l[2]) end
  if nxt then wait = math.max(0, nxt - now) end
  if #out == 0 and redis.call('HEXISTS', P .. ':groups', ARGV[2]) == 0 then wait = -2 end
end
return {out, wait}
"""
)

# ARGV: P, n, then the n settlements in one string, a line each (newline-separated):
# group TAB action TAB id TAB token TAB arg, then the sender (the transport's id, which
# the wake-up of a delayed nack carries) -> {1|0 ...}
# arg: delay ms (nack), lease ms (extend), failure JSON (dead; JSON has no raw tab or
# newline). One argument instead of five per settlement: redis-py packs each argument
# in Python, and that was the largest cost of an ack in the consumer's profile.
_SETTLE = (
    _PRELUDE
    + """
local now = now_ms()
local nows = int(now)
local acts, eids, toks, args, res, groups, woken = {}, {}, {}, {}, {}, {}, {}
local n = 0
local line = '([^\\t\\n]*)\\t([^\\t\\n]*)\\t([^\\t\\n]*)\\t([^\\t\\n]*)\\t([^\\n]*)'
for g, action, id, token, arg in string.gmatch(ARGV[3], line) do
  n = n + 1
  acts[n], eids[n], toks[n], args[n], res[n] = action, id, token, arg, 0
  local gl = groups[g]
  if not gl then
    gl = {}
    groups[g] = gl
  end
  gl[#gl + 1] = n
end
for g, gl in pairs(groups) do
  local base = gbase(g)
  local meta, lz, dz, bodies = base .. ':meta', base .. ':lease', base .. ':due', base .. ':body'
  local ids = {}
  for j, x in ipairs(gl) do ids[j] = eids[x] end
  -- a matching token is a lease: a claim sets both at once, a nack clears the token
  -- as it ends the lease, an ack or dead-letter deletes both (no ZMSCORE: Redis would
  -- format every score with snprintf)
  local ms = vget('HMGET', meta, ids)
  local ended, acked, processed, keyed = {}, {}, 0, {}
  for j, x in ipairs(gl) do
    local action, id, token, arg = acts[x], eids[x], toks[x], args[x]
    local m = ms[j]
    if m and not ended[id] then
      local tok, k = parse_for_settle(m)
      if tok == token and token ~= '' then
        res[x] = 1
        if action == 'extend' then
          redis.call('ZADD', lz, int(now + tonumber(arg)), id)
        elseif action == 'nack' then
          local a, _, first = parse(m)
          ended[id] = true
          redis.call('ZREM', lz, id)
          redis.call('ZADD', dz, int(now + tonumber(arg)), id)
          redis.call('HSET', meta, id, a .. '||' .. first .. '|' .. k)
          redis.call('HINCRBY', base .. ':cnt', 'retried', 1)
          if tonumber(arg) > 0 then
            -- due later: a timer in every process (the sender's listener skips this:
            -- its settle call set one already)
            redis.call('PUBLISH', P .. ':wake', arg .. ' ' .. g .. '\t' .. ARGV[4])
          else
            woken[g] = true
          end
        else
          ended[id] = true
          if k ~= '' then
            keyed[#keyed + 1] = id
            keyed[#keyed + 1] = k
          end
          if action == 'ack' then
            acked[#acked + 1] = id
            processed = processed + 1
          else
            local body = redis.call('HGET', bodies, id)
            redis.call('ZREM', lz, id)
            redis.call('HDEL', meta, id)
            redis.call('HDEL', bodies, id)
            dead_letter(base, g, body, arg, nows)
          end
        end
      end
    end
  end
  if #acked > 0 then
    vcall('ZREM', lz, acked)
    vcall('HDEL', meta, acked)
    vcall('HDEL', bodies, acked)
    redis.call('HINCRBY', base .. ':cnt', 'processed', int(processed))
  end
  -- the keys of the ended entries: a turn no later entry waits for is freed (one HMGET
  -- and one HDEL for the batch), the others pass to the key's next entry
  if #keyed > 0 then
    local kh, keys = base .. ':kh', {}
    for j = 2, #keyed, 2 do keys[#keys + 1] = string.sub(keyed[j], 2) end
    local held = vget('HMGET', kh, keys)
    local free, seen = {}, {}
    for j = 1, #keys do
      local id, kk = keyed[2 * j - 1], keys[j]
      if held[j] == id and not seen[kk] then
        free[#free + 1] = kk
      elseif pass_key(base, dz, id, keyed[2 * j], nows) then
        woken[g] = true
      end
      seen[kk] = true
    end
    vcall('HDEL', kh, free)
  end
end
for g, _ in pairs(woken) do wake(gbase(g)) end
return res
"""
)

# ARGV: P, n, then (group, spec, '1' for an unordered group's stream else '') * n
# -> 1 if the registry changed
_DECLARE = (
    _PRELUDE
    + """
local changed = 0
local i = 3
for s = 1, tonumber(ARGV[2]) do
  if redis.call('HGET', P .. ':groups', ARGV[i]) ~= ARGV[i + 1] then
    redis.call('HSET', P .. ':groups', ARGV[i], ARGV[i + 1])
    changed = 1
  end
  if ARGV[i + 2] == '1' then
    -- its stream and consumer group 'n' (BUSYGROUP, when they exist, is no error)
    redis.pcall('XGROUP', 'CREATE', gbase(ARGV[i]) .. ':s', 'n', '0', 'MKSTREAM')
  end
  i = i + 3
end
if changed == 1 then redis.call('INCR', P .. ':groups:version') end
return changed
"""
)

# ARGV: P, logmax, n, then (dead letter id, keyenc) * n -> how many were replayed
_REPLAY = (
    _PRELUDE
    + """
local nows = int(now_ms())
local count = 0
local per = {}
local i = 4
for s = 1, tonumber(ARGV[3]) do
  local dl, k = ARGV[i], ARGV[i + 1]
  i = i + 2
  local h = P .. ':dl:' .. dl
  local g = redis.call('HGET', h, 'g')
  if g and redis.call('HEXISTS', P .. ':groups', g) == 1 then
    local body = redis.call('HGET', h, 'b')
    stage(per, g, append(body), body, k, nows)
    redis.call('DEL', h)
    redis.call('ZREM', P .. ':dl', dl)
    redis.call('ZREM', gbase(g) .. ':dl', dl)
    count = count + 1
  end
end
flush(per, nows, ARGV[2])
return count
"""
)

# ARGV: P, group ('' = any), then dead letter ids (none: all of the group / all)
_PURGE = (
    _PRELUDE
    + """
local group = ARGV[2]
local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
elseif group ~= '' then
  ids = redis.call('ZRANGE', gbase(group) .. ':dl', 0, -1)
else
  ids = redis.call('ZRANGE', P .. ':dl', 0, -1)
end
local count = 0
for _, dl in ipairs(ids) do
  local h = P .. ':dl:' .. dl
  local g = redis.call('HGET', h, 'g')
  if g and (group == '' or g == group) then
    redis.call('DEL', h)
    redis.call('ZREM', P .. ':dl', dl)
    redis.call('ZREM', gbase(g) .. ':dl', dl)
    count = count + 1
  end
end
return count
"""
)

# ARGV: P, then groups -> per group {total, in_flight, delayed, dead, processed, retried, dl'd}
_STATS = (
    _PRELUDE
    + """
local now = now_ms()
local out = {}
for i = 2, #ARGV do
  local base = gbase(ARGV[i])
  local c = redis.call('HMGET', base .. ':cnt', 'processed', 'retried', 'dead_lettered')
  -- an unordered function's stream: its entries, those handed out, its retries
  local s, streamed, pending, later = base .. ':s', 0, 0, redis.call('ZCARD', base .. ':later')
  if redis.call('EXISTS', s) == 1 then
    streamed = redis.call('XLEN', s)
    local p = redis.pcall('XPENDING', s, 'n')
    if type(p) == 'table' then pending = p[1] end
  end
  out[#out + 1] = {
    redis.call('HLEN', base .. ':body') + streamed + later,
    redis.call('ZCOUNT', base .. ':lease', '(' .. int(now), '(+inf') + pending,
    redis.call('ZCOUNT', base .. ':due', '(' .. int(now), '(+inf') + later,
    redis.call('ZCARD', base .. ':dl'),
    tonumber(c[1] or 0), tonumber(c[2] or 0), tonumber(c[3] or 0)}
end
return out
"""
)


# An unordered function's entries live in its stream ``<base>:s`` (field ``b``: the
# event; an entry a nack put back also ``a``, the attempts before it, and ``f``, the
# first attempt's ms), handed out by the consumer group ``n`` (``XREADGROUP``) and
# acked with ``XACK`` + ``XDEL``: no script on the hot path. A delivery's lease is its
# pending entry: its owner (the consumer's name) and its delivery count fence it.
# ``<base>:ext`` holds leases extended past the visibility timeout (id -> deadline
# ms), ``<base>:later`` the retries waiting for their delay (scored by due ms; member:
# ``old id|attempts|first ms|body``).

# ARGV: P, group, consumer, visibility timeout ms, limit -> {id, body, attempts before
# the entry, its delivery count, first_ms, ...}, ms until the next retry is due (-1:
# none).
# Moves the retries that are due into the stream, then takes over (XCLAIM) up to
# ``limit`` entries whose lease expired: idle past the visibility timeout and not
# extended past now.
_SCLAIM = (
    _PRELUDE
    + """
local base = gbase(ARGV[2])
local s, later, ext, me = base .. ':s', base .. ':later', base .. ':ext', ARGV[3]
local vt, limit = ARGV[4], tonumber(ARGV[5])
local now = now_ms()
local nows = int(now)
local due = redis.call('ZRANGEBYSCORE', later, '-inf', nows, 'LIMIT', '0', '1000')
for _, m in ipairs(due) do
  local a, f, body = string.match(m, '^[^|]*|(%d+)|(%d+)|(.*)$')
  redis.call('XADD', s, '*', 'b', body, 'a', a, 'f', f)
end
if #due > 0 then vcall('ZREM', later, due) end
local out = {}
if limit > 0 then
  local taken = 0
  local idle = redis.call('XPENDING', s, 'n', 'IDLE', vt, '-', '+', int(limit + 100))
  for _, p in ipairs(idle) do
    if taken >= limit then break end
    local id = p[1]
    local deadline = redis.call('ZSCORE', ext, id)
    if not deadline or tonumber(deadline) <= now then
      if deadline then redis.call('ZREM', ext, id) end
      local got = redis.call('XCLAIM', s, 'n', me, vt, id)
      local e = got[1]
      if e then
        local body, a, f = entry_fields(e[2])
        if f == '' then f = string.match(id, '^(%d+)') end
        taken = taken + 1
        local n = #out
        out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = id, body, a, p[4] + 1, f
      end
    end
  end
end
local wait = -1
local nxt = redis.call('ZRANGE', later, 0, 0, 'WITHSCORES')
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {out, wait}
"""
)

# ARGV: P, the settlements in one string, a line each: group TAB action TAB id TAB
# consumer TAB delivery count TAB attempt TAB first ms TAB arg, then the sender
# -> {1|0 ...}. Settles an unordered function's deliveries whose owner must be checked:
# a settlement counts only while the entry is pending to the same consumer with the
# same delivery count (a takeover changes one or the other). arg: delay ms (nack),
# lease ms (extend), failure JSON (dead).
_SSETTLE = (
    _PRELUDE
    + """
local now = now_ms()
local nows = int(now)
local res = {}
local line = '([^\\t\\n]*)\\t([^\\t\\n]*)\\t([^\\t\\n]*)\\t([^\\t\\n]*)\\t([^\\t\\n]*)\\t'
  .. '([^\\t\\n]*)\\t([^\\t\\n]*)\\t([^\\n]*)'
for g, action, id, me, count, a, first, arg in string.gmatch(ARGV[2], line) do
  local base = gbase(g)
  local s = base .. ':s'
  local ok = 0
  local p = redis.pcall('XPENDING', s, 'n', id, id, '1', me)
  if type(p) == 'table' and p[1] and tostring(p[1][4]) == count then
    ok = 1
    if action == 'extend' then
      redis.call('ZADD', base .. ':ext', int(now + tonumber(arg)), id)
    else
      local body = nil
      if action ~= 'ack' then
        local e = redis.call('XRANGE', s, id, id)[1]
        if e then body = entry_fields(e[2]) end
      end
      redis.call('XACK', s, 'n', id)
      redis.call('XDEL', s, id)
      redis.call('ZREM', base .. ':ext', id)
      if action == 'ack' then
        redis.call('HINCRBY', base .. ':cnt', 'processed', 1)
      elseif body and action == 'nack' then
        redis.call('HINCRBY', base .. ':cnt', 'retried', 1)
        if tonumber(arg) > 0 then
          redis.call('ZADD', base .. ':later', int(now + tonumber(arg)),
            id .. '|' .. a .. '|' .. first .. '|' .. body)
          redis.call('PUBLISH', P .. ':wake', arg .. ' ' .. g .. '\t' .. ARGV[3])
        else
          redis.call('XADD', s, '*', 'b', body, 'a', a, 'f', first)
        end
      elseif body then
        dead_letter(base, g, body, arg, nows)
      end
    end
  end
  res[#res + 1] = ok
end
return res
"""
)

# ARGV: P, group, consumer -> 1 if the consumer, holding no entry, left the group
_SLEAVE = (
    _PRELUDE
    + """
local s = gbase(ARGV[2]) .. ':s'
local p = redis.pcall('XPENDING', s, 'n', '-', '+', '1', ARGV[3])
if type(p) == 'table' and #p == 0 then
  redis.call('XGROUP', 'DELCONSUMER', s, 'n', ARGV[3])
  return 1
end
return 0
"""
)


# -- errors --------------------------------------------------------------------------------


@contextlib.contextmanager
def _translated(config: RedisConfig) -> Iterator[None]:
    """Redis client errors -> nerve's tree (never showing the URL's password)."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BrokerUnavailable(
            f"cannot reach Redis at {config.host}:{config.port} ({detail}); start "
            "redis-server there or fix the host, port or password in the broker URL"
        ) from None
    except redis_errors.RedisError as exc:
        raise TransportError(
            f"Redis at {config.host}:{config.port} refused an operation: {exc}"
        ) from None


# -- deliveries and consumers -------------------------------------------------------------

_Settlement = tuple["RedisDelivery", str, str]


class _RedisDelivery:
    """What both kinds of Redis delivery share: settling goes through ``_settle``."""

    __slots__ = (
        "_consumer",
        "_event",
        "attempt",
        "entry_id",
        "first_at",
        "group",
        "raw",
        "received_at",
    )

    def __init__(
        self,
        consumer: RedisConsumer,
        entry_id: str,
        raw: bytes,
        attempt: int,
        first_at: float,
        received_at: float,
    ) -> None:
        self._consumer = consumer
        self._event: Event | None = None
        self.group = consumer.group
        self.entry_id = entry_id
        self.raw = raw
        self.attempt = attempt
        self.first_at = first_at
        self.received_at = received_at

    @property
    def event(self) -> Event:
        if self._event is None:
            self._event = codec.decode(self.raw)
        return self._event

    async def _settle(self, action: str, arg: str) -> None:
        raise NotImplementedError

    async def ack(self) -> None:
        await self._settle("ack", "")

    async def nack(self, delay: float = 0.0) -> None:
        await self._settle("nack", str(_ms(delay)))

    async def dead_letter(self, failure: Failure) -> None:
        await self._settle("dead", orjson.dumps(failure.to_json()).decode())

    async def extend(self, seconds: float) -> None:
        await self._settle("extend", str(_ms(seconds)))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.group}#{self.entry_id} attempt={self.attempt}>"


class RedisDelivery(_RedisDelivery):
    """A delivery of an ordered function's entry, leased with a random token."""

    __slots__ = ("token",)

    def __init__(
        self,
        consumer: RedisConsumer,
        entry_id: str,
        token: str,
        raw: bytes,
        attempt: int,
        first_at: float,
        received_at: float,
    ) -> None:
        super().__init__(consumer, entry_id, raw, attempt, first_at, received_at)
        self.token = token

    async def _settle(self, action: str, arg: str) -> None:
        await self._consumer.transport._settle(self, action, arg)


class StreamDelivery(_RedisDelivery):
    """A delivery of an unordered function's stream entry. Its lease is the entry
    pending to this consumer with this delivery count; until ``lease_until`` (monotonic,
    the visibility timeout after the read was sent, less a margin) nobody can have taken
    it over, so an ack needs no check then: ``XACK`` + ``XDEL``, no script."""

    __slots__ = ("count", "extended", "lease_until")

    def __init__(
        self,
        consumer: RedisConsumer,
        entry_id: str,
        raw: bytes,
        attempt: int,
        count: int,
        first_at: float,
        received_at: float,
        lease_until: float,
    ) -> None:
        super().__init__(consumer, entry_id, raw, attempt, first_at, received_at)
        self.count = count
        self.lease_until = lease_until
        self.extended = False

    async def _settle(self, action: str, arg: str) -> None:
        await self._consumer.transport._ssettle(self, action, arg)

    async def extend(self, seconds: float) -> None:
        sent = time.monotonic()
        await super().extend(seconds)
        self.extended = True
        self.lease_until = max(self.lease_until, sent + seconds - _margin(seconds))

    def line(self, action: str, arg: str) -> str:
        """This settlement as a line of the ssettle script's argument."""
        return (
            f"{self.group}\t{action}\t{self.entry_id}\t{self._consumer._name}\t{self.count}"
            f"\t{self.attempt}\t{int(self.first_at * 1000)}\t{arg}"
        )


def _margin(lease: float) -> float:
    """What a consumer takes off a lease it counts itself, for the time between an ack's
    sending and Redis running it."""
    return min(1.0, lease / 4)


_SettledStream = tuple[StreamDelivery, str, str]


def _keyenc(key: str | None) -> str:
    """An ordering key as the scripts store it: '' for none, else '=' and the key with
    TAB, newline and % escaped (the scripts split their packed arguments on TAB and
    newline; escaping % keeps the encoding one-to-one)."""
    if key is None:
        return ""
    if "%" in key or "\t" in key or "\n" in key:
        key = key.replace("%", "%25").replace("\t", "%09").replace("\n", "%0A")
    return "=" + key


def _resp(commands: Sequence[Sequence[str]]) -> bytes:
    """``commands`` in the Redis protocol (RESP), one after the other (encoded once, as
    a whole: an argument's length is its UTF-8 length)."""
    out: list[str] = []
    for command in commands:
        out.append(f"*{len(command)}\r\n")
        out += [f"${len(a) if a.isascii() else len(a.encode())}\r\n{a}\r\n" for a in command]
    return "".join(out).encode()


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


class RedisConsumer:
    """Fetches one function's entries. A fetch that finds nothing waits *in Redis*: one
    round trip holds a ``BLPOP`` on the group's wake list (a token pushed by every
    script that makes entries due) and on this consumer's own one (local wake-ups and
    close), and the claim script right behind it, which Redis runs as soon as the
    ``BLPOP`` returns. A published event reaches a waiting handler in one hop, as a
    blocking ``XREADGROUP`` would."""

    def __init__(self, transport: RedisTransport, subscription: Subscription) -> None:
        self.transport = transport
        self.subscription = subscription
        self.group = subscription.group
        base = _base(transport._prefix, self.group)
        name = os.urandom(8).hex()
        self._wake_keys = (f"{base}:wake", f"{base}:wake:{name}")
        """The group's wake list and this consumer's own."""
        self._stop_key = f"{base}:stop:{name}"
        """Set by close() while a fetch waits: its claim then takes nothing."""
        self.waiting = False
        """A fetch waits in Redis: a wake-up must reach it through Redis."""
        self._woken = False
        """A wake-up came while no fetch waited: the next fetch claims at once."""
        self._due = 0.0
        """Monotonic time from which an entry may be claimable (what the last claim
        said); until then a fetch waits in Redis for a wake token first."""
        self._closed = False
        self._declared = False
        self._stream = not subscription.ordered
        """An unordered function: its entries come from its stream (``_fetch_stream``)."""
        self._name = name
        """This consumer's name in the stream's consumer group."""
        self._skey = f"{base}:s"
        self._reader: Any = None
        """A connection of this consumer's own for its blocking reads (close() ends a
        waiting read by closing it)."""
        self._look_at = 0.0
        """Monotonic time of the next look for due retries and expired leases."""
        config = transport.config
        self._look_every = min(config.poll_interval, config.visibility_timeout / 2)

    async def fetch(
        self, limit: int, timeout: float
    ) -> Sequence[RedisDelivery] | Sequence[StreamDelivery]:
        transport = self.transport
        if not self._declared:
            declared = await transport._require_group(self.group)
            self._stream = not declared.ordered
            self._declared = True
        if limit <= 0:
            return []
        if self._stream:
            return await self._fetch_stream(limit, timeout)
        deadline = time.monotonic() + timeout
        while not self._closed:
            token = os.urandom(8).hex()
            now = time.monotonic()
            if self._due <= now or self._woken:
                # something may be claimable now: claim without waiting
                self._woken = False
                rows, wait_ms = await transport._claim(self.group, limit, token)
            else:
                # the last claim took everything due: wait for a token (or until the
                # next entry is due), and claim in the same round trip. First one
                # event-loop turn: the handlers of what the last fetch returned start
                # before redis-py spends its 100-200 us building the request
                await asyncio.sleep(0)
                now = time.monotonic()
                block = min(deadline - now, transport.config.poll_interval, self._due - now)
                block = max(block, 0.001)  # BLPOP's 0 would wait for ever
                rows, wait_ms = await transport._wait_and_claim(self, block, limit, token)
            if wait_ms == -2:  # the server lost the group (restarted without persistence)
                await transport._declare_again([self.subscription])
                wait_ms = 0
            now = time.monotonic()
            if wait_ms > 0:  # (a margin for the server's clock, in ms)
                self._due = now + wait_ms / 1000 + 0.002
            else:  # 0: more are due, claim at once; -1 (or -3): nothing is pending
                self._due = now if wait_ms == 0 else now + _NEVER
            if rows:
                wall = time.time()
                flat = iter(rows)  # id, body, attempt, first_ms, id, ...
                return [
                    RedisDelivery(
                        self, bytes(eid).decode(), token, bytes(body), int(a), int(f) / 1000, wall
                    )
                    for eid, body, a, f in zip(flat, flat, flat, flat, strict=True)
                ]
            if wait_ms == -3 or now >= deadline:
                return []
        return []

    async def _fetch_stream(self, limit: int, timeout: float) -> list[StreamDelivery]:
        """Up to ``limit`` entries of the function's stream: retries that came due and
        leases that expired first (looked for every ``_look_every`` seconds), then new
        entries (``XREADGROUP``, blocking in Redis until one arrives or it is time to
        look again)."""
        transport = self.transport
        vt = transport.config.visibility_timeout
        lease = vt - _margin(vt)
        deadline = time.monotonic() + timeout
        while not self._closed:
            sent = time.monotonic()
            out: list[StreamDelivery] = []
            if sent >= self._look_at:
                rows, wait_ms = await transport._look(self, limit)
                self._look_at = sent + self._look_every
                if wait_ms >= 0:
                    self._look_at = min(self._look_at, sent + wait_ms / 1000 + 0.002)
                if rows:
                    wall = time.time()
                    flat = iter(rows)  # id, body, attempts before, count, first_ms, ...
                    out = [
                        StreamDelivery(
                            self,
                            bytes(eid).decode(),
                            bytes(body),
                            int(a) + int(n),
                            int(n),
                            int(f) / 1000,
                            wall,
                            sent + lease,
                        )
                        for eid, body, a, n, f in zip(flat, flat, flat, flat, flat, strict=True)
                    ]
            if len(out) < limit:
                sent = time.monotonic()
                block = None
                if not out:
                    wait = min(deadline, self._look_at) - sent
                    block = max(1, int(wait * 1000))
                entries = await self._read(limit - len(out), block)
                if entries:
                    wall = time.time()
                    until = sent + lease
                    for eid, fields in entries:
                        if len(fields) == 2:  # b -> the event: a first delivery
                            out.append(
                                StreamDelivery(
                                    self, eid.decode(), fields[1], 1, 1, wall, wall, until
                                )
                            )
                            continue
                        named = dict(zip(fields[::2], fields[1::2], strict=True))
                        before = int(named.get(b"a", 0))
                        first = int(named[b"f"]) / 1000 if b"f" in named else wall
                        out.append(
                            StreamDelivery(
                                self, eid.decode(), named[b"b"], before + 1, 1, first, wall, until
                            )
                        )
            if out:
                return out
            if time.monotonic() >= deadline:
                return []
        return []

    async def _read(self, count: int, block: int | None) -> list[Any]:
        """New entries of the stream for this consumer (``XREADGROUP ... >``): [id,
        [field, value, ...]] each. Sent and read on the consumer's own connection as
        RESP, without redis-py's command layer (which packs and parses an entry in
        Python, a dict per entry)."""
        transport = self.transport
        conn = self._reader
        if conn is None:
            pool: Any = transport._client().connection_pool  # (redis-py's is untyped)
            conn = self._reader = pool.make_connection()
        command: list[str] = ["XREADGROUP", "GROUP", "n", self._name, "COUNT", str(count)]
        if block is not None:
            command += ["BLOCK", str(block)]
        command += ["STREAMS", self._skey, ">"]
        self.waiting = block is not None
        try:
            await conn.send_packed_command(_resp([command]), check_health=False)
            reply: Any = await conn.read_response(timeout=math.inf)
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                with _translated(transport.config):
                    raise
            # the server lost the group (restarted without persistence): declare again
            await transport._declare_again([self.subscription])
            return []
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await conn.disconnect()  # (what is left unread must not reach the next)
            if self._closed and not isinstance(exc, asyncio.CancelledError):
                return []  # close() closed the connection under the waiting read
            with _translated(transport.config):
                raise
        finally:
            self.waiting = False
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {stream: entries}
            return cast("list[Any]", next(iter(reply.values())))
        return cast("list[Any]", reply[0][1])

    async def ack_many(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """One settle script for the batch, its lines packed here (acks need none of
        ``_settle_batch``'s per-settlement work: no timers, no errors to build)."""
        if not deliveries:
            return []
        if self._stream:
            batch = [(d, "ack", "") for d in cast("Sequence[StreamDelivery]", deliveries)]
            outcomes = await self.transport._ssettle_batch(batch)
            return [d for d, error in zip(deliveries, outcomes, strict=True) if error]
        mine = cast("Sequence[RedisDelivery]", deliveries)  # (this consumer's)
        packed = "\n".join([f"{d.group}\tack\t{d.entry_id}\t{d.token}\t" for d in mine])
        transport = self.transport
        outcomes = await transport._run("settle", [len(deliveries), packed, transport._id])
        return [d for d, ok in zip(deliveries, outcomes, strict=True) if not ok]

    async def close(self) -> None:
        self._closed = True
        self.transport._consumers.discard(self)
        if self.waiting:
            with contextlib.suppress(NerveError):
                await self.transport._wake_consumer(self, stop=True)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            with contextlib.suppress(Exception):
                await reader.disconnect()
            with contextlib.suppress(NerveError):  # holding nothing, it leaves the group
                await self.transport._run("sleave", [self.group, self._name])


class _Router:
    """The group registry as last read, and which groups an event goes to."""

    def __init__(self, version: bytes = b"", groups: Sequence[Subscription] = ()) -> None:
        self.version = version
        self.groups = {g.group: g for g in groups}
        self._by_type: dict[str, list[Subscription]] = {}

    def targets(self, event: Event) -> list[Subscription]:
        candidates = self._by_type.get(event.type)
        if candidates is None:
            candidates = [
                g for g in self.groups.values() if Subscription(g.group, g.patterns).matches(event)
            ]
            self._by_type[event.type] = candidates
        return [g for g in candidates if not g.filters or g.matches(event)]


# -- the transport ------------------------------------------------------------------------


class RedisTransport:
    """Redis (standalone, 6.2+) as a broker."""

    def __init__(self, config: RedisConfig | str | None = None) -> None:
        if isinstance(config, str):
            self.url = config
            config = RedisConfig.from_url(config)
        else:
            config = config or RedisConfig()
            self.url = config.connection_url
        self.config = config
        self.features = self._features(durable=False)
        self._prefix = config.prefix
        self._wake_channel = f"{config.prefix}:wake"
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._ingester: asyncio.Task[None] | None = None
        self._stopping = False
        self._router = _Router()
        self._consumers: set[RedisConsumer] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._id = os.urandom(8).hex()
        """Names this transport in the wake-ups its delayed nacks send to every process
        (its own listener skips them: it set the timer already)."""
        self._waking: set[asyncio.Future[None]] = set()
        self._settler: Coalescer[_Settlement, None] = Coalescer(self._settle_batch)
        self._ssettler: Coalescer[_SettledStream, None] = Coalescer(self._ssettle_batch)
        self._scripts: dict[str, Any] = {}
        self._declared: dict[str, Subscription] = {}
        self._publishing = asyncio.Semaphore(_PUBLISHES_AT_ONCE)

    def _features(self, *, durable: bool) -> Features:
        return Features(
            durable=durable,
            shared_across_processes=True,
            key_ordering=True,
            dead_letter_queue=True,
            max_payload=self.config.max_payload,
        )

    def __repr__(self) -> str:
        return f"RedisTransport({self.config.host}:{self.config.port}, prefix={self._prefix!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        client = aioredis.Redis.from_url(
            self.config.connection_url, socket_connect_timeout=5.0, decode_responses=False
        )
        self._redis = client
        try:
            with _translated(self.config):
                await client.ping()
                self.features = self._features(durable=await self._server_is_durable(client))
                for name, source in (
                    ("publish", _PUBLISH),
                    ("claim", _CLAIM),
                    ("settle", _SETTLE),
                    ("declare", _DECLARE),
                    ("replay", _REPLAY),
                    ("purge", _PURGE),
                    ("stats", _STATS),
                    ("sclaim", _SCLAIM),
                    ("ssettle", _SSETTLE),
                    ("sleave", _SLEAVE),
                ):
                    self._scripts[name] = client.register_script(source)
                self._pubsub = client.pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(self._wake_channel)
                await self._refresh_router()
        except BaseException:
            await self.close()
            raise
        self._listener = asyncio.create_task(self._listen())
        if self.config.ingest:
            with _translated(self.config):
                await self._create_ingest_group()
            self._ingester = asyncio.create_task(self._ingest_loop())

    @staticmethod
    async def _server_is_durable(client: aioredis.Redis) -> bool:
        """Durable only when every write is in the AOF and fsynced before the reply."""
        try:
            aof = await client.config_get("appendonly")
            fsync = await client.config_get("appendfsync")
        except redis_errors.ResponseError:  # CONFIG renamed or disabled (managed Redis)
            return False
        values = {_text(k or ""): _text(v or "") for k, v in {**aof, **fsync}.items()}
        return values.get("appendonly") == "yes" and values.get("appendfsync") == "always"

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.close()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for waking in list(self._waking):  # wake-ups of consumers now closed
            waking.cancel()
        self._stopping = True
        if self._ingester is not None:
            # let the blocking read end by itself (cancelling redis-py mid-command can
            # leave the task waiting on its connection); cancel only as a last resort
            await asyncio.wait([self._ingester], timeout=2 * _INGEST_BLOCK)
        for task in (self._listener, self._ingester):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=2.0)
        self._listener = self._ingester = None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    async def _listen(self) -> None:
        """Wake this process's consumers when any process publishes or releases work."""
        pubsub = self._pubsub
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # connection lost: fetches fall back to polling meanwhile
                await asyncio.sleep(0.5)
                continue
            if not message or message.get("type") != "message":
                continue
            delay, _, rest = bytes(message["data"]).decode().partition(" ")
            group, _, sender = rest.partition("\t")
            if sender == self._id:
                continue  # a nack of this transport's: _settle_batch set its timer
            if delay.isdigit() and int(delay) > 0:
                self._wake_later(group, int(delay) / 1000)
            else:
                self._wake_groups({group})

    async def _create_ingest_group(self) -> None:
        try:
            await self._client().xgroup_create(
                f"{self._prefix}:ingest", "nerve", "0", mkstream=True
            )
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _ingest_loop(self) -> None:
        """Route what other programs XADD to ``<prefix>:ingest``. The stream's consumer
        group shares the work between nerve processes; an entry a dead process read but
        never routed is taken over after the visibility timeout."""
        client = self._client()
        stream = f"{self._prefix}:ingest"
        name = f"{os.getpid()}-{os.urandom(4).hex()}"
        idle = _ms(self.config.visibility_timeout)
        while not self._stopping:
            try:
                reply: Any = await client.xautoclaim(stream, "nerve", name, idle, "0-0", count=100)
                batch = [(i, f) for i, f in reply[1] if f]
                if not batch:
                    read: Any = await client.xreadgroup(
                        "nerve", name, {stream: ">"}, 100, int(_INGEST_BLOCK * 1000)
                    )
                    batch = [(i, f) for i, f in read[0][1] if f] if read else []
                if batch:
                    await self._ingest(stream, batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker is away or refused: try again shortly
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):  # the stream was deleted: recreate
                    await self._create_ingest_group()

    async def _ingest(self, stream: str, batch: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        valid: list[tuple[Event, bytes, str]] = []
        client = self._client()
        for entry_id, fields in batch:
            raw = fields.get(b"event", b"")
            try:
                if len(raw) > self.config.max_payload:
                    raise PayloadTooLarge(len(raw), self.config.max_payload)
                valid.append((codec.decode(raw), raw, entry_id.decode()))
            except (PayloadTooLarge, InvalidEvent) as exc:
                # not an event: keep it aside with the reason, never route it
                rejected: dict[Any, Any] = {**fields, b"error": str(exc).encode()}
                async with client.pipeline(transaction=True) as pipe:
                    pipe.xadd(
                        f"{stream}:rejected",
                        rejected,
                        maxlen=10_000,
                        approximate=True,
                    )
                    pipe.xack(stream, "nerve", entry_id)
                    pipe.xdel(stream, entry_id)
                    await pipe.execute()
        if valid:
            await self._publish(valid, None)

    def _wake_groups(self, groups: set[str]) -> None:
        """Wake this process's consumers of ``groups`` that wait (a delay is due). An
        unordered function's due retries are moved into its stream, which wakes its
        waiting reads."""
        streams: set[str] = set()
        for consumer in self._consumers:
            if consumer.group not in groups:
                continue
            if consumer._stream:
                consumer._look_at = 0.0
                streams.add(consumer.group)
                continue
            if not consumer.waiting:
                consumer._woken = True
                continue
            task = asyncio.ensure_future(self._wake_consumer(consumer))
            self._waking.add(task)
            task.add_done_callback(self._wake_sent)
        vt = _ms(self.config.visibility_timeout)
        for group in streams:
            task = asyncio.ensure_future(self._run("sclaim", [group, "", vt, 0]))
            self._waking.add(task)
            task.add_done_callback(self._wake_sent)

    def _wake_sent(self, task: asyncio.Future[None]) -> None:
        self._waking.discard(task)
        if not task.cancelled():
            task.exception()  # seen: the broker is away, and the fetch's timeout wakes it

    async def _wake_consumer(self, consumer: RedisConsumer, *, stop: bool = False) -> None:
        """A token in ``consumer``'s own wake list (with ``stop``: its claim takes
        nothing). Both keys expire, should the consumer never look again."""
        client = self._client()
        with _translated(self.config):
            async with client.pipeline(transaction=False) as pipe:
                if stop:
                    pipe.set(consumer._stop_key, 1, px=60_000)
                pipe.lpush(consumer._wake_keys[1], 1)
                pipe.pexpire(consumer._wake_keys[1], 60_000)
                await pipe.execute()

    def _wake_later(self, group: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._wake_groups({group})

        handle = loop.call_later(delay + 0.002, fire)
        self._timers.add(handle)

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise TransportError("the Redis transport is not started (await start() first)")
        return self._redis

    async def _run(self, name: str, args: Sequence[str | bytes | int]) -> Any:
        self._client()
        with _translated(self.config):
            return await self._scripts[name](keys=[], args=[self._prefix, *args])

    # -- declaring and publishing ----------------------------------------------------

    async def declare(self, subscriptions: Sequence[Subscription]) -> None:
        await self._declare_again(subscriptions)
        for sub in subscriptions:
            self._declared[sub.group] = sub

    async def _declare_again(self, subscriptions: Sequence[Subscription]) -> None:
        """Declare ``subscriptions`` (again, after a server restart without persistence
        lost the registry: consumers and publishers of this process heal it)."""
        args: list[str | bytes | int] = [len(subscriptions)]
        for sub in subscriptions:
            args += [sub.group, orjson.dumps(sub.to_json()), "" if sub.ordered else "1"]
        await self._run("declare", args)
        await self._refresh_router(heal=False)

    async def _refresh_router(self, *, heal: bool = True) -> None:
        client = self._client()
        with _translated(self.config):
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(f"{self._prefix}:groups:version")
                pipe.hvals(f"{self._prefix}:groups")
                version, specs = await pipe.execute()
        router = _Router(version or b"0", [Subscription.from_json(orjson.loads(s)) for s in specs])
        lost = [sub for name, sub in self._declared.items() if name not in router.groups]
        if heal and lost:
            await self._declare_again(lost)  # the server forgot groups this process declared
            return
        self._router = router

    def _encode(self, events: Sequence[Event]) -> list[tuple[Event, bytes]]:
        return encode_checked(events, self.config.max_payload)

    async def publish(self, events: Sequence[Event], *, to_group: str | None = None) -> None:
        if not events:
            return
        await self._publish([(event, body, "") for event, body in self._encode(events)], to_group)

    async def _publish(self, encoded: list[tuple[Event, bytes, str]], to_group: str | None) -> None:
        for _ in range(10):
            router = self._router
            if to_group is not None and to_group not in router.groups:
                await self._refresh_router()
                router = self._router
                if to_group not in router.groups:
                    raise TransportError(f"no consumer group named {to_group!r} is declared")
            routes: list[str] = []
            bodies: list[bytes] = []
            for event, body, ingest_id in encoded:
                targets = [router.groups[to_group]] if to_group else router.targets(event)
                bodies.append(body)
                route = ingest_id
                for sub in targets:
                    enc = _keyenc(event.partitionkey) if sub.ordered else "*"
                    route += f"\t{sub.group}\t{enc}"
                routes.append(route)
            routes.append("")  # every line ends with a newline
            args: list[str | bytes | int] = [
                router.version,
                self.config.log_max,
                len(encoded),
                "\n".join(routes),
                *bodies,
            ]
            async with self._publishing:
                published = await self._run("publish", args)
            if published != -1:
                return
            await self._refresh_router()  # another process declared a group meanwhile
        raise TransportError("the group registry kept changing while publishing; try again")

    # -- consuming -------------------------------------------------------------------

    def consumer(self, subscription: Subscription) -> RedisConsumer:
        consumer = RedisConsumer(self, subscription)
        self._consumers.add(consumer)
        return consumer

    async def _require_group(self, group: str) -> Subscription:
        """The group as declared (its layout follows the declaration: an unordered
        function's entries are in its stream, whatever a consumer's copy says)."""
        client = self._client()
        with _translated(self.config):
            spec = await client.hget(f"{self._prefix}:groups", group)
        if spec is None:
            raise TransportError(f"declare group {group!r} before consuming it")
        return Subscription.from_json(orjson.loads(spec))

    def _claim_args(self, group: str, limit: int, token: str) -> list[str | int]:
        """The claim script's arguments after the prefix (the stop key may follow)."""
        return [group, limit, _ms(self.config.visibility_timeout), token]

    async def _claim(self, group: str, limit: int, token: str) -> tuple[list[Any], int]:
        rows, wait_ms = await self._run("claim", self._claim_args(group, limit, token))
        return rows, int(wait_ms)

    async def _wait_and_claim(
        self, consumer: RedisConsumer, block: float, limit: int, token: str
    ) -> tuple[list[Any], int]:
        """Wait up to ``block`` seconds for a wake token, then claim, in one round trip
        (the claim runs in Redis right after the ``BLPOP`` returns or times out)."""
        script = self._scripts["claim"]
        args = [self._prefix, *self._claim_args(consumer.group, limit, token), consumer._stop_key]
        consumer.waiting = True
        try:
            with _translated(self.config):
                async with self._client().pipeline(transaction=False) as pipe:
                    pipe.blpop(list(consumer._wake_keys), block)
                    pipe.evalsha(script.sha, 0, *args)
                    try:
                        _, (rows, wait_ms) = await pipe.execute()
                    except redis_errors.NoScriptError:  # the server restarted: load it
                        return await self._claim(consumer.group, limit, token)
        finally:
            consumer.waiting = False
        return rows, int(wait_ms)

    async def _look(self, consumer: RedisConsumer, limit: int) -> tuple[list[Any], int]:
        """Move ``consumer``'s due retries into its stream and take over up to ``limit``
        entries whose lease expired."""
        vt = _ms(self.config.visibility_timeout)
        try:
            rows, wait_ms = await self._run("sclaim", [consumer.group, consumer._name, vt, limit])
        except TransportError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._declare_again([consumer.subscription])
            return [], 0
        return rows, int(wait_ms)

    async def _ssettle(self, delivery: StreamDelivery, action: str, arg: str) -> None:
        await self._ssettler.submit((delivery, action, arg))

    async def _ssettle_batch(self, batch: list[_SettledStream]) -> list[BaseException | None]:
        """Settle stream deliveries: the acks still inside their lease in one pipeline
        (``XACK``, ``XDEL`` and the count, per group), the rest in one ssettle script,
        which checks each one's owner first."""
        now = time.monotonic()
        fast: dict[str, list[StreamDelivery]] = {}
        checked: list[int] = []
        for i, (delivery, action, _) in enumerate(batch):
            if action == "ack" and now < delivery.lease_until:
                fast.setdefault(delivery.group, []).append(delivery)
            else:
                checked.append(i)
        results: list[BaseException | None] = [None] * len(batch)
        if fast:
            commands: list[list[str]] = []
            for group, acked in fast.items():
                for delivery in acked:
                    delivery.lease_until = 0.0  # settled: a second try is checked
                base = _base(self._prefix, group)
                ids = [d.entry_id for d in acked]
                commands.append(["XACK", f"{base}:s", "n", *ids])
                commands.append(["XDEL", f"{base}:s", *ids])
                commands.append(["HINCRBY", f"{base}:cnt", "processed", str(len(ids))])
                extended = [d.entry_id for d in acked if d.extended]
                if extended:
                    commands.append(["ZREM", f"{base}:ext", *extended])
            await self._send(commands)
        if checked:
            packed = "\n".join(batch[i][0].line(batch[i][1], batch[i][2]) for i in checked)
            outcomes = await self._run("ssettle", [packed, self._id])
            for i, ok in zip(checked, outcomes, strict=True):
                delivery, action, arg = batch[i]
                if ok and action != "extend":
                    delivery.lease_until = 0.0  # settled: a second try is checked
                results[i] = self._outcome(delivery, action, arg, ok)
        return results

    async def _send(self, commands: list[list[str]]) -> list[Any]:
        """Run ``commands`` in one round trip on a connection of the pool, packed here
        (redis-py's pipeline packs each argument in Python: 1.4 µs an acked event)."""
        pool: Any = self._client().connection_pool  # (redis-py's is untyped)
        with _translated(self.config):
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(_resp(commands), check_health=False)
                return [await conn.read_response() for _ in commands]
            except BaseException:
                await conn.disconnect()  # (what is left unread must not reach the next)
                raise
            finally:
                await pool.release(conn)

    async def _settle(self, delivery: RedisDelivery, action: str, arg: str) -> None:
        await self._settler.submit((delivery, action, arg))

    async def _settle_batch(self, batch: list[_Settlement]) -> list[BaseException | None]:
        packed = "\n".join(
            f"{d.group}\t{action}\t{d.entry_id}\t{d.token}\t{arg}" for d, action, arg in batch
        )
        outcomes = await self._run("settle", [len(batch), packed, self._id])
        return [
            self._outcome(delivery, action, arg, ok)
            for (delivery, action, arg), ok in zip(batch, outcomes, strict=True)
        ]

    def _outcome(
        self, delivery: _RedisDelivery, action: str, arg: str, ok: int
    ) -> BaseException | None:
        """What a settle script's answer for one settlement means: LeaseLost if it was
        refused; a delayed nack also sets this process's timer for the retry."""
        if not ok:
            return LeaseLost(
                f"{delivery!r}: the lease expired and another consumer took "
                f"the event over; this {action} was refused"
            )
        if action == "nack" and int(arg) > 0:
            self._wake_later(delivery.group, int(arg) / 1000)
        return None

    # -- optional abilities: dead letters, stats, log ----------------------------------

    async def _dead_entries(self, ids: Sequence[bytes | str]) -> list[DeadLetterEntry]:
        client = self._client()
        with _translated(self.config):
            async with client.pipeline(transaction=False) as pipe:
                for dl in ids:
                    pipe.hmget(f"{self._prefix}:dl:{_text(dl)}", "g", "b", "f")
                rows = await pipe.execute()
        entries = []
        for dl, (group, body, failure) in zip(ids, rows, strict=True):
            if group is None or body is None or failure is None:
                continue  # purged or replayed meanwhile
            try:
                event: Event | None = codec.decode(body)
            except Exception:
                event = None
            entries.append(
                DeadLetterEntry(
                    id=_text(dl),
                    group=group.decode(),
                    raw=bytes(body),
                    failure=Failure(**orjson.loads(failure)),
                    event=event,
                )
            )
        return entries

    def _dead_index(self, group: str | None) -> str:
        return f"{self._prefix}:dl" if group is None else f"{_base(self._prefix, group)}:dl"

    async def dead_letters(
        self, group: str | None = None, *, limit: int = 100
    ) -> list[DeadLetterEntry]:
        if limit <= 0:
            return []
        client = self._client()
        with _translated(self.config):
            ids: Any = await client.zrange(self._dead_index(group), 0, limit - 1)
        return await self._dead_entries(ids)

    async def dead_letter_entry(self, entry_id: str) -> DeadLetterEntry | None:
        if not entry_id.isdigit():
            return None
        found = await self._dead_entries([entry_id])
        return found[0] if found else None

    async def _select_dead(
        self, entry_ids: Sequence[str] | None, group: str | None
    ) -> list[DeadLetterEntry]:
        if entry_ids is not None:
            entries = await self._dead_entries([i for i in map(str, entry_ids) if i.isdigit()])
        else:
            client = self._client()
            with _translated(self.config):
                ids: Any = await client.zrange(self._dead_index(group), 0, -1)
            entries = await self._dead_entries(ids)
        return [e for e in entries if group is None or e.group == group]

    async def replay(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        entries = await self._select_dead(entry_ids, group)
        if not entries:
            return 0
        await self._refresh_router()
        args: list[str | bytes | int] = [self.config.log_max, len(entries)]
        for entry in entries:
            sub = self._router.groups.get(entry.group)
            key = entry.event.partitionkey if entry.event is not None else None
            if sub is not None and not sub.ordered:
                args += [entry.id, "*"]  # into its stream
            else:
                args += [entry.id, _keyenc(key) if sub is not None else ""]
        return int(await self._run("replay", args))

    async def purge(
        self, entry_ids: Sequence[str] | None = None, *, group: str | None = None
    ) -> int:
        if entry_ids is not None:
            ids = [i for i in map(str, entry_ids) if i.isdigit()]
            if not ids:
                return 0
            return int(await self._run("purge", [group or "", *ids]))
        return int(await self._run("purge", [group or ""]))

    async def stats(self) -> list[GroupStats]:
        await self._refresh_router()
        groups = sorted(self._router.groups)
        rows = await self._run("stats", groups) if groups else []
        out = []
        for group, row in zip(groups, rows, strict=True):
            total, in_flight, delayed, dead, processed, retried, dead_lettered = map(int, row)
            out.append(
                GroupStats(
                    group=group,
                    ready=max(0, total - in_flight - delayed),
                    delayed=delayed,
                    in_flight=in_flight,
                    dead_letters=dead,
                    processed=processed,
                    retried=retried,
                    dead_lettered=dead_lettered,
                )
            )
        return out

    async def read_log(self, after: int | None, limit: int) -> list[tuple[int, bytes]]:
        client = self._client()
        with _translated(self.config):
            if after is None:
                seq = await client.get(f"{self._prefix}:seq")
                return [(int(seq or 0), b"")]
            rows: Any = await client.xrange(f"{self._prefix}:log", f"({after}-1", "+", count=limit)
        # an entry per publish: position -> body (an older nerve's: 'b' -> the body of
        # the position in the entry's id)
        events = [
            (int(bytes(rid).split(b"-")[0]) if name == b"b" else int(name), bytes(body))
            for rid, fields in rows
            for name, body in fields.items()
        ]
        return [e for e in events if e[0] > after][:limit]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

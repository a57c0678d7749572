"""The Lua scripts of the cluster: every change that touches more than one key is one script, so it
is atomic (no other client sees half of it), replicated and written to the AOF as one unit.

Each script gets the prefix as ARGV[1] and computes its key names from it (docs/scale-out.md has the
data model); KEYS[1] is always the job index, only so that a Redis Cluster client routes the call
to the slot of the prefix's hash tag. Numbers go in and out as strings: Lua would print a large
number with 14 digits and lose the low ones of a queue rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from imagegen.engine.distributed.keys import GROUP, PRIORITY_MAX, PRIORITY_WEIGHT, Keys

_PRELUDE = f"""
local P = ARGV[1]
local RUNS = P .. ':runs'
local GROUP = '{GROUP}'
local function jkey(id) return P .. ':job:' .. id end
local function is_final(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end
-- A job event for every replica's SSE listeners: {{"job", "event", "data"}}; data is JSON already.
local function emit(id, event, data)
  redis.call('PUBLISH', P .. ':events', '{{"job":"' .. id .. '","event":"' .. event .. '","data":' .. data .. '}}')
end
-- A run's stream entry is done: out of the pending list (no lease any more) and out of the stream.
local function done_entry(token)
  if token and token ~= '' then
    redis.call('XACK', RUNS, GROUP, token)
    redis.call('XDEL', RUNS, token)
  end
end
local function position(route, rank)
  return redis.call('ZCOUNT', P .. ':queue:' .. route, '-inf', '(' .. rank)
end
-- The one way a job becomes final: only once (first finisher wins), leaving every queue, set and
-- stream entry, queueing its webhook, and telling a second run (if any) to stop.
local function finalize(id, status, finished_at, result, err, ttl_ms, token)
  local k = jkey(id)
  local cur = redis.call('HMGET', k, 'status', 'route', 'run', 'callback_url')
  if not cur[1] then return -1 end
  if is_final(cur[1]) then
    redis.call('HINCRBY', P .. ':stats', 'finalize_refused', 1)
    return 0
  end
  redis.call('ZREM', P .. ':queue:' .. cur[2], id)
  redis.call('ZREM', P .. ':queued', id)
  redis.call('SREM', P .. ':running', id)
  done_entry(token)
  local run = cur[3]
  if run and run ~= '' and run ~= token then
    done_entry(run)
    redis.call('PUBLISH', P .. ':control', '{{"cancel":"' .. id .. '"}}')
  end
  redis.call('HSET', k, 'status', status, 'finished_at', finished_at, 'result', result, 'error', err, 'run', '')
  if cur[4] and cur[4] ~= '' then
    redis.call('ZADD', P .. ':outbox', finished_at, id)
  end
  if tonumber(ttl_ms) > 0 then redis.call('PEXPIRE', k, ttl_ms) end
  emit(id, status, '{{"status":"' .. status .. '"}}')
  return 1
end
-- Back to its queue at its old place (its rank keeps priority and admission order).
local function requeue(id, uncount)
  local k = jkey(id)
  local f = redis.call('HMGET', k, 'route', 'rank', 'created_at')
  redis.call('HSET', k, 'status', 'queued', 'started_at', '', 'step', '0', 'total', '0', 'run', '', 'worker', '')
  if uncount then redis.call('HINCRBY', k, 'attempts', -1) end
  redis.call('SREM', P .. ':running', id)
  redis.call('ZADD', P .. ':queue:' .. f[1], f[2], id)
  redis.call('ZADD', P .. ':queued', f[3], id)
  redis.call('PUBLISH', P .. ':wake', f[1])
  emit(id, 'queued', '{{"status":"queued","queue_position":' .. position(f[1], f[2]) .. '}}')
end
"""

# ARGV: P, max_queue, id, created_at, priority, route, field, value, ...
# -> {1, position} admitted, {0, queued} the queue is full
_ADMIT = f"""
local queued = P .. ':queued'
local n = redis.call('ZCARD', queued)
if n >= tonumber(ARGV[2]) then return {{0, n}} end
local id, created, route = ARGV[3], ARGV[4], ARGV[6]
local seq = redis.call('INCR', P .. ':seq')
local rank = string.format('%.0f', ({PRIORITY_MAX} - tonumber(ARGV[5])) * {PRIORITY_WEIGHT} + seq)
local fields = {{}}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', jkey(id), 'rank', rank, 'seq', seq, unpack(fields))
redis.call('ZADD', P .. ':jobs', created, id)
redis.call('ZADD', queued, created, id)
redis.call('ZADD', P .. ':queue:' .. route, rank, id)
redis.call('SADD', P .. ':routes', route)
local pos = position(route, rank)
redis.call('PUBLISH', P .. ':wake', route)
emit(id, 'queued', '{{"status":"queued","queue_position":' .. pos .. '}}')
return {{1, pos}}
"""

# ARGV: P, consumer, now, head id, other ids... -> {id, token, {job hash}, ...}; {} when the head is gone
_CLAIM = """
local consumer, now = ARGV[2], ARGV[3]
local function take(id)
  local f = redis.call('HMGET', jkey(id), 'status', 'route')
  if f[1] ~= 'queued' then return false end
  return redis.call('ZREM', P .. ':queue:' .. f[2], id) == 1
end
redis.pcall('XGROUP', 'CREATE', RUNS, GROUP, '$', 'MKSTREAM')  -- BUSYGROUP (it exists) is the usual answer
if not take(ARGV[4]) then return {} end
local claimed = {ARGV[4]}
for i = 5, #ARGV do
  if take(ARGV[i]) then claimed[#claimed + 1] = ARGV[i] end
end
-- An entry nobody read (there should be none) is read here first, so that the read below returns
-- exactly the entries added now; such a stray one lapses later and the reclaimer drops it.
redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', 1000, 'STREAMS', RUNS, '>')
for _, id in ipairs(claimed) do
  redis.call('XADD', RUNS, '*', 'job', id)
end
local read = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', #claimed, 'STREAMS', RUNS, '>')
local entries = read[1][2]
local out = {}
for i, id in ipairs(claimed) do
  local token = entries[i][1]
  local k = jkey(id)
  redis.call('ZREM', P .. ':queued', id)
  redis.call('SADD', P .. ':running', id)
  redis.call('HINCRBY', k, 'attempts', 1)
  redis.call('HSET', k, 'status', 'running', 'started_at', now, 'step', '0', 'total', '0',
             'worker', consumer, 'run', token)
  emit(id, 'running', '{"status":"running","batch_size":' .. #claimed .. '}')
  out[#out + 1] = id
  out[#out + 1] = token
  out[#out + 1] = redis.call('HGETALL', k)  -- the job as it is now: no second round trip
end
return out
"""

# ARGV: P, consumer, step, total, data JSON, id, token, ... -> {1|0 per job}: 0 = no longer this run's
_PROGRESS = """
local out = {}
for i = 6, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local k = jkey(id)
  local f = redis.call('HMGET', k, 'status', 'run')
  if f[1] == 'running' and f[2] == token then
    redis.call('HSET', k, 'step', ARGV[3], 'total', ARGV[4])
    redis.call('XCLAIM', RUNS, GROUP, ARGV[2], 0, token, 'JUSTID')  -- renews the lease (idle time 0)
    emit(id, 'progress', ARGV[5])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# ARGV: P, id, token, status, finished_at, result, error, ttl_ms -> 1 done, 0 already final, -1 unknown
_FINALIZE = """
return finalize(ARGV[2], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[3])
"""

# ARGV: P, id, finished_at, error, ttl_ms -> {1, status before} cancelled, {0, final status}, {-1, ''}
_CANCEL = """
local s = redis.call('HGET', jkey(ARGV[2]), 'status')
if not s then return {-1, ''} end
if is_final(s) then return {0, s} end
finalize(ARGV[2], 'cancelled', ARGV[3], '', ARGV[4], ARGV[5], '')
return {1, s}
"""

# ARGV: P, consumer, lease_ms, max_attempts, now, ttl_ms, error, count -> {id, 'requeued'|'failed', ...}
_RECLAIM = """
local out = {}
local cursor = '0-0'
for _ = 1, 10 do
  local reply = redis.call('XAUTOCLAIM', RUNS, GROUP, ARGV[2], ARGV[3], cursor, 'COUNT', ARGV[8])
  cursor = reply[1]
  for _, entry in ipairs(reply[2]) do
    local token, fields = entry[1], entry[2]
    local id = nil
    if fields then
      for i = 1, #fields, 2 do
        if fields[i] == 'job' then id = fields[i + 1] end
      end
    end
    if id then
      local f = redis.call('HMGET', jkey(id), 'status', 'run', 'attempts')
      if f[1] == 'running' and f[2] == token then
        redis.call('HINCRBY', P .. ':stats', 'lease_expired', 1)
        if tonumber(f[3]) >= tonumber(ARGV[4]) then
          finalize(id, 'failed', ARGV[5], '', ARGV[7], ARGV[6], token)
          redis.call('HINCRBY', P .. ':stats', 'failed_after_lease', 1)
          out[#out + 1] = id
          out[#out + 1] = 'failed'
        else
          requeue(id, false)
          redis.call('HINCRBY', P .. ':stats', 'reclaimed', 1)
          out[#out + 1] = id
          out[#out + 1] = 'requeued'
        end
      end
    end
    done_entry(token)
  end
  if cursor == '0-0' then break end
end
return out
"""

# ARGV: P, id, token -> 1 given back (queued again, the attempt not counted), 0 not this run's any more
_RELEASE = """
local f = redis.call('HMGET', jkey(ARGV[2]), 'status', 'run')
if f[1] == 'running' and f[2] == ARGV[3] then
  requeue(ARGV[2], true)
  done_entry(ARGV[3])
  return 1
end
return 0
"""

# ARGV: P, now, lease until, count -> ids whose webhook is due, now leased to the caller until then
_CLAIM_WEBHOOKS = """
local due = redis.call('ZRANGEBYSCORE', P .. ':outbox', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do
  redis.call('ZADD', P .. ':outbox', ARGV[3], id)
end
return due
"""

# ARGV: P, count -> entries of the job index whose job expired, removed (the oldest `count` looked at)
_PRUNE = """
local ids = redis.call('ZRANGE', P .. ':jobs', 0, tonumber(ARGV[2]) - 1)
local removed = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', jkey(id)) == 0 then
    redis.call('ZREM', P .. ':jobs', id)
    removed = removed + 1
  end
end
return removed
"""

# ARGV: P, worker name, heartbeat JSON -> Redis's clock (seconds): liveness never depends on node clocks
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', P .. ':workers', ARGV[2], ARGV[3])
redis.call('ZADD', P .. ':workers:seen', string.format('%.6f', now), ARGV[2])
return string.format('%.6f', now)
"""


@dataclass(frozen=True)
class Claimed:
    job_id: str
    #: The run's stream entry id: the token that proves, in every later script, that it is this run.
    token: str
    #: The job's hash as the claim left it (running, attempts counted).
    fields: dict[str, str]

    @property
    def attempts(self) -> int:
        return int(self.fields.get("attempts", 0))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class Scripts:
    """The scripts, registered on one client (EVALSHA, and EVAL again after a Redis restart)."""

    def __init__(self, conn: Redis, keys: Keys) -> None:
        self.conn = conn
        self.keys = keys

        def script(body: str) -> AsyncScript:
            return conn.register_script(_PRELUDE + body)

        self._admit = script(_ADMIT)
        self._claim = script(_CLAIM)
        self._progress = script(_PROGRESS)
        self._finalize = script(_FINALIZE)
        self._cancel = script(_CANCEL)
        self._reclaim = script(_RECLAIM)
        self._release = script(_RELEASE)
        self._claim_webhooks = script(_CLAIM_WEBHOOKS)
        self._prune = script(_PRUNE)
        self._heartbeat = script(_HEARTBEAT)

    async def _run(self, script: AsyncScript, *args: Any) -> Any:
        return await script(keys=[self.keys.jobs], args=[self.keys.prefix, *args])

    async def ensure_group(self) -> None:
        """The runs stream and its consumer group (after a start on an empty Redis, or one that lost its data)."""
        try:
            await self.conn.xgroup_create(self.keys.runs, GROUP, id="$", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def admit(
        self, max_queue: int, job_id: str, created_at: float, priority: int, route: str, fields: dict[str, str]
    ) -> tuple[bool, int]:
        """(True, queue position) when admitted; (False, jobs queued) when the queue is full."""
        flat = [item for pair in fields.items() for item in pair]
        ok, number = await self._run(self._admit, str(max_queue), job_id, repr(created_at), str(priority), route, *flat)
        return bool(int(ok)), int(number)

    async def claim(self, consumer: str, now: float, job_ids: Sequence[str]) -> list[Claimed]:
        reply = await self._run(self._claim, consumer, repr(now), *job_ids)
        claimed = []
        for index in range(0, len(reply), 3):
            flat = reply[index + 2]
            fields = {str(flat[position]): str(flat[position + 1]) for position in range(0, len(flat), 2)}
            claimed.append(Claimed(str(reply[index]), str(reply[index + 1]), fields))
        return claimed

    async def progress(
        self, consumer: str, step: int, total: int, data: dict[str, Any], runs: Sequence[tuple[str, str]]
    ) -> list[bool]:
        flat = [item for pair in runs for item in pair]
        reply = await self._run(
            self._progress, consumer, str(step), str(total), json.dumps(data, separators=(",", ":")), *flat
        )
        return [bool(int(value)) for value in reply]

    async def finalize(
        self,
        job_id: str,
        token: str,
        status: str,
        finished_at: float,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        ttl_ms: int,
    ) -> int:
        return int(
            await self._run(
                self._finalize,
                job_id,
                token,
                status,
                repr(finished_at),
                _json(result),
                _json(error),
                str(ttl_ms),
            )
        )

    async def cancel(self, job_id: str, finished_at: float, error: dict[str, Any], ttl_ms: int) -> tuple[int, str]:
        outcome, status = await self._run(self._cancel, job_id, repr(finished_at), _json(error), str(ttl_ms))
        return int(outcome), _text(status)

    async def reclaim(
        self,
        consumer: str,
        lease_ms: int,
        max_attempts: int,
        now: float,
        ttl_ms: int,
        error: dict[str, Any],
        count: int = 100,
    ) -> list[tuple[str, str]]:
        reply = await self._run(
            self._reclaim,
            consumer,
            str(lease_ms),
            str(max_attempts),
            repr(now),
            str(ttl_ms),
            _json(error),
            str(count),
        )
        return [(str(reply[index]), str(reply[index + 1])) for index in range(0, len(reply), 2)]

    async def release(self, job_id: str, token: str) -> bool:
        return bool(int(await self._run(self._release, job_id, token)))

    async def claim_webhooks(self, now: float, until: float, count: int = 16) -> list[str]:
        return [str(item) for item in await self._run(self._claim_webhooks, repr(now), repr(until), str(count))]

    async def heartbeat(self, worker: str, report: dict[str, Any]) -> float:
        return float(await self._run(self._heartbeat, worker, json.dumps(report, separators=(",", ":"))))

    async def prune(self, count: int = 200) -> int:
        return int(await self._run(self._prune, str(count)))


def _json(value: dict[str, Any] | None) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)

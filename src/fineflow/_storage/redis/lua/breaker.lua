-- fineflow: one atomic step of a circuit breaker's shared row, the Lua form of step_row() in
-- fineflow/_breaker/shared.py (the reference the tests hold it to), on the server's clock.
--
-- KEYS[1] is the row: a hash with the fields state ("closed", "open", "half_open"),
-- generation, open_until (ms on the server's clock), step (consecutive opens: the backoff
-- step), granted and successes (of the half-open round), half_open_since (ms). A missing
-- hash or field is the row of a name never seen: closed, generation 0.
--
-- ARGV: action, generation, want, reset_ms, multiplier, cap_ms, shorten, max_calls,
-- to_close, max_wait_ms, channel, name, publish. The action is
--   'read'     nothing changes (the row on the server's clock)
--   'open'     a closed row opens (an open or half-open one is returned as it is)
--   'acquire'  a due open row turns half-open; a half-open row grants up to want trial
--              permits, at most max_calls per round in total, or reopens when the round
--              had no verdict within max_wait_ms
--   'success'  a trial of round generation succeeded: to_close of them close the row
--   'failure'  a trial of round generation failed: the row reopens, backed off
--   'close'    reset() by hand
-- A reopen lasts min(reset_ms * multiplier ^ step, cap_ms) * shorten. Every change of the
-- generation is published on the channel with the command publish ("publish" on one
-- server; "spublish" on a Cluster, the channel in the row's slot) as JSON: name, state,
-- generation, open_ms. Returns {state, generation, open_ms, granted}: open_ms the
-- milliseconds left until the open deadline (a string: Redis would truncate a number),
-- granted the permits this step granted.

local key, action = KEYS[1], ARGV[1]
local want_generation, want = tonumber(ARGV[2]), tonumber(ARGV[3])
local reset_ms, multiplier, cap_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local shorten, max_calls, to_close = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local max_wait_ms = tonumber(ARGV[10])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000

local f = redis.call('HMGET', key, 'state', 'generation', 'open_until', 'step', 'granted',
  'successes', 'half_open_since')
local r = {
  state = f[1] or 'closed',
  generation = tonumber(f[2]) or 0,
  open_until = tonumber(f[3]) or 0,
  step = tonumber(f[4]) or 0,
  granted = tonumber(f[5]) or 0,
  successes = tonumber(f[6]) or 0,
  half_open_since = tonumber(f[7]) or 0,
}
local before = r.generation
local changed = false
local grant = 0

local function closed()
  r = { state = 'closed', generation = r.generation + 1, open_until = 0, step = 0,
        granted = 0, successes = 0, half_open_since = 0 }
  changed = true
end

local function reopen()
  local timeout = math.min(reset_ms * multiplier ^ math.min(r.step, 64), cap_ms) * shorten
  r = { state = 'open', generation = r.generation + 1, open_until = now + timeout,
        step = r.step + 1, granted = 0, successes = 0, half_open_since = 0 }
  changed = true
end

if action == 'open' then
  if r.state == 'closed' then reopen() end
elseif action == 'close' then
  closed()
elseif action == 'acquire' then
  if r.state == 'open' and now >= r.open_until then
    r.state, r.generation, r.half_open_since = 'half_open', r.generation + 1, now
    r.granted, r.successes, r.open_until = 0, 0, 0
    changed = true
  end
  if r.state == 'half_open' then
    if now >= r.half_open_since + max_wait_ms then
      reopen()
    else
      grant = math.max(math.min(want, max_calls - r.granted), 0)
      if grant > 0 then
        r.granted = r.granted + grant
        changed = true
      end
    end
  end
elseif action == 'success' or action == 'failure' then
  if r.state == 'half_open' and r.generation == want_generation then
    if action == 'failure' then
      reopen()
    elseif r.successes + 1 >= to_close then
      closed()
    else
      r.successes = r.successes + 1
      changed = true
    end
  end
elseif action ~= 'read' then
  return redis.error_reply('unknown breaker action ' .. tostring(action))
end

local function float(x) return string.format('%.17g', x) end

if changed then
  redis.call('HSET', key, 'state', r.state, 'generation', string.format('%d', r.generation),
    'open_until', float(r.open_until), 'step', string.format('%d', r.step),
    'granted', string.format('%d', r.granted), 'successes', string.format('%d', r.successes),
    'half_open_since', float(r.half_open_since))
end

local open_ms = 0
if r.state == 'open' then open_ms = math.max(r.open_until - now, 0) end

if r.generation ~= before then
  redis.call(ARGV[13], ARGV[11], cjson.encode({
    name = ARGV[12], state = r.state, generation = r.generation, open_ms = open_ms,
  }))
end

return { r.state, r.generation, float(open_ms), grant }

-- fineflow: one atomic step of a circuit breaker's shared row, the Lua form of step_row() and
-- count_row() in fineflow/_breaker/shared.py (the reference the tests hold it to), on the
-- server's clock.
--
-- KEYS[1] is the row: a hash with the fields state ("closed", "open", "half_open"),
-- generation, open_until (ms on the server's clock), step (consecutive opens: the backoff
-- step), granted and successes (of the half-open round), half_open_since (ms). A missing
-- hash or field is the row of a name never seen: closed, generation 0.
-- The shared counting of a closed row has the fields counted (the generation the counters
-- belong to; missing: -1), streak, window_start (ms on the server's clock), calls, failures,
-- slow, previous_calls, previous_failures and previous_slow. Only 'count' reads or writes
-- them: counters of any generation but the row's are stale, and the first 'count' of a closed
-- generation starts them afresh, so no other action touches them.
--
-- ARGV: action, generation, want, reset_ms, multiplier, cap_ms, shorten, max_calls,
-- to_close, max_wait_ms, channel, name, publish; for 'count' also successes, failures, slow,
-- trailing (the tally), failure_threshold, failure_rate, slow_rate ('' or absent: no such
-- policy), minimum_calls, window_calls (0: a time window), window_ms. The action is
--   'read'     nothing changes (the row on the server's clock)
--   'open'     a closed row opens (an open or half-open one is returned as it is)
--   'acquire'  a due open row turns half-open; a half-open row grants up to want trial
--              permits, at most max_calls per round in total, or reopens when the round
--              had no verdict within max_wait_ms
--   'success'  a trial of round generation succeeded: to_close of them close the row
--   'failure'  a trial of round generation failed: the row reopens, backed off
--   'close'    reset() by hand
--   'count'    a tally of outcomes counted while the row was closed at generation is added
--              to the row's counting: the streak (a tally with a success sets it to
--              trailing, one without adds its failures), and a sliding window (two fixed
--              windows, the previous one weighted by what is left of it) of window_calls
--              calls or of window_ms; the row reopens when the streak reaches
--              failure_threshold, or the failure or slow-call rate of at least minimum_calls
--              calls reaches its threshold. A tally of any other generation, or of a row
--              that is not closed, is stale: nothing changes.
-- A reopen lasts min(reset_ms * multiplier ^ step, cap_ms) * shorten. Every change of the
-- generation is published on the channel with the command publish ("publish" on one
-- server; "spublish" on a Cluster, the channel in the row's slot) as JSON: name, state,
-- generation, open_ms. Returns {state, generation, open_ms, granted}: open_ms the
-- milliseconds left until the open deadline (a string: Redis would truncate a number),
-- granted the permits this step granted; 'count' returns the streak (of a closed row whose
-- counters are of its generation; else 0) in granted's place.

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

local function float(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end

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

-- The counting fields (missing: 0, but counted -1).
local COUNTING = { 'counted', 'streak', 'window_start', 'calls', 'failures', 'slow',
  'previous_calls', 'previous_failures', 'previous_slow' }
local count_writes = {}  -- the counting fields 'count' changed, for HSET
local streak = 0  -- the reply of 'count'

-- count_row(): the arithmetic in the same order as the reference (Lua numbers are doubles
-- too); times in ms where the reference has seconds (only their ratios matter).
local function count()
  local f = redis.call('HMGET', key, unpack(COUNTING))
  local stored, c = {}, {}
  for i, field in ipairs(COUNTING) do
    stored[field] = tonumber(f[i]) or (field == 'counted' and -1 or 0)
    c[field] = stored[field]
  end
  if r.state == 'closed' and c.counted == r.generation then streak = c.streak end
  if r.state ~= 'closed' or r.generation ~= want_generation then return end

  local function optional(x) if x == nil or x == '' then return nil end return tonumber(x) end
  local successes, failures = tonumber(ARGV[14]), tonumber(ARGV[15])
  local slow, trailing = tonumber(ARGV[16]), tonumber(ARGV[17])
  local threshold, failure_rate = optional(ARGV[18]), optional(ARGV[19])
  local slow_rate, minimum_calls = optional(ARGV[20]), tonumber(ARGV[21])
  local window_calls, width = tonumber(ARGV[22]), tonumber(ARGV[23])

  if c.counted ~= r.generation then  -- the first tally of this closed generation
    c = { counted = r.generation, streak = 0, window_start = now, calls = 0, failures = 0,
          slow = 0, previous_calls = 0, previous_failures = 0, previous_slow = 0 }
  end
  if window_calls == 0 and now - c.window_start >= width then
    -- the current window ended: it becomes the previous one (if adjacent)
    local ended = math.floor((now - c.window_start) / width)
    c.window_start = c.window_start + ended * width
    if ended == 1 then
      c.previous_calls, c.previous_failures, c.previous_slow = c.calls, c.failures, c.slow
    else
      c.previous_calls, c.previous_failures, c.previous_slow = 0, 0, 0
    end
    c.calls, c.failures, c.slow = 0, 0, 0
  end
  if successes > 0 then c.streak = trailing else c.streak = c.streak + failures end
  c.calls = c.calls + (successes + failures)
  c.failures = c.failures + failures
  c.slow = c.slow + slow
  if window_calls > 0 and c.calls >= window_calls then
    c.previous_calls, c.previous_failures, c.previous_slow = c.calls, c.failures, c.slow
    c.calls, c.failures, c.slow = 0, 0, 0
  end
  local weight
  if window_calls > 0 then
    weight = 1.0 - c.calls / window_calls
  else
    weight = 1.0 - (now - c.window_start) / width
  end
  local calls = c.previous_calls * weight + c.calls
  local failed = c.previous_failures * weight + c.failures
  local slowed = c.previous_slow * weight + c.slow
  local trips = threshold ~= nil and c.streak >= threshold
  if not trips and calls >= minimum_calls and calls > 0 then
    trips = (failure_rate ~= nil and failed / calls >= failure_rate) or
      (slow_rate ~= nil and slowed / calls >= slow_rate)
  end
  if trips then
    reopen()  -- a new generation: the counters are stale, no need to write them
    streak = 0
    return
  end
  streak = c.streak
  for _, field in ipairs(COUNTING) do
    if c[field] ~= stored[field] then
      local text = field == 'window_start' and float(c[field]) or int(c[field])
      count_writes[#count_writes + 1] = field
      count_writes[#count_writes + 1] = text
    end
  end
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
elseif action == 'count' then
  count()
elseif action ~= 'read' then
  return redis.error_reply('unknown breaker action ' .. tostring(action))
end

if changed then
  redis.call('HSET', key, 'state', r.state, 'generation', int(r.generation),
    'open_until', float(r.open_until), 'step', int(r.step), 'granted', int(r.granted),
    'successes', int(r.successes), 'half_open_since', float(r.half_open_since))
end
if #count_writes > 0 then redis.call('HSET', key, unpack(count_writes)) end

local open_ms = 0
if r.state == 'open' then open_ms = math.max(r.open_until - now, 0) end

if r.generation ~= before then
  redis.call(ARGV[13], ARGV[11], cjson.encode({
    name = ARGV[12], state = r.state, generation = r.generation, open_ms = open_ms,
  }))
end

if action == 'count' then grant = streak end
return { r.state, r.generation, float(open_ms), grant }

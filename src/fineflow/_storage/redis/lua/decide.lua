-- fineflow: decide the quotas of one request, all or nothing (one call, atomic).
--
-- The same arithmetic as the reference functions in fineflow/_ratelimit/algorithms.py, on
-- exact integers: Lua's numbers are doubles, exact only below 2^53, and nanoseconds since
-- the epoch (about 1.7e18) are past that, so times and the products of the sliding window
-- are decimal strings computed with the small bignum helpers below.
--
-- KEYS: per quota, its state hash then its key's index set (2 per quota).
-- ARGV[1]: "gcra", "fixed_window" or "sliding_window".
-- ARGV[2]: now in nanoseconds since the epoch, or "" for the server's TIME.
-- ARGV[3..]: per quota, 5 values:
--   cost (clamped to capacity + 1 by the client, so it fits a double),
--   cap (gcra: the capacity; windows: the limit),
--   span (gcra: cost * T; windows: the period in ns),
--   tau (gcra: the tolerance in ns; windows: unused),
--   meta (what status() needs to rebuild the quota; stored as it is).
-- Returns {admitted (1 or 0), now, then per quota the state it found: t ("" for none), used,
-- prev}. The client computes the decisions from these with the reference functions.
--
-- ARGV[1] == "refund" gives back what an earlier call charged (Redis Cluster: the quotas of
-- a request on several slots are charged slot by slot, and refunded when one denies):
-- ARGV[2]: the algorithm; KEYS: the state hashes; ARGV[3..]: per quota, 3 values:
--   cost, then gcra: cost * T and ""; windows: the window start charged and the next
--   window's start (where the charge has become the previous window's count).
-- Returns the number of states refunded.
--
-- A state hash has fields t, u, p (the BucketState), a (its algorithm), m (meta), ok and no
-- (allowed and denied cost, for status and stats). It expires (PEXPIRE) when it becomes
-- equivalent to no state; the index set lives as long as its longest-lived state.

local B = 10000000 -- limb base: a limb product plus carries stays exact in a double

local function strip(a)
  while #a > 1 and a[#a] == 0 do a[#a] = nil end
  return a
end

local function parse(s) -- a non-negative decimal string -> limbs, least significant first
  local n, i = {}, #s
  while i >= 1 do
    local j = math.max(i - 6, 1)
    n[#n + 1] = tonumber(string.sub(s, j, i))
    i = j - 1
  end
  if #n == 0 then n[1] = 0 end
  return strip(n)
end

local function str(a)
  local parts = { string.format('%d', a[#a]) }
  for i = #a - 1, 1, -1 do parts[#parts + 1] = string.format('%07d', a[i]) end
  return table.concat(parts)
end

local function cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  for i = #a, 1, -1 do
    if a[i] ~= b[i] then return a[i] < b[i] and -1 or 1 end
  end
  return 0
end

local function add(a, b)
  local r, carry = {}, 0
  for i = 1, math.max(#a, #b) do
    local s = (a[i] or 0) + (b[i] or 0) + carry
    if s >= B then r[i], carry = s - B, 1 else r[i], carry = s, 0 end
  end
  if carry > 0 then r[#r + 1] = carry end
  return r
end

local function sub(a, b) -- a - b, for a >= b
  local r, borrow = {}, 0
  for i = 1, #a do
    local s = a[i] - (b[i] or 0) - borrow
    if s < 0 then r[i], borrow = s + B, 1 else r[i], borrow = s, 0 end
  end
  return strip(r)
end

local function mul(a, b)
  local r = {}
  for i = 1, #a + #b do r[i] = 0 end
  for i = 1, #a do
    local carry, ai = 0, a[i]
    for j = 1, #b do
      local cur = r[i + j - 1] + ai * b[j] + carry
      carry = math.floor(cur / B)
      r[i + j - 1] = cur - carry * B
    end
    local k = i + #b
    while carry > 0 do
      local cur = r[k] + carry
      carry = math.floor(cur / B)
      r[k] = cur - carry * B
      k = k + 1
    end
  end
  return strip(r)
end

local function approx(a) -- a as a double (for estimates only)
  local x = 0
  for i = #a, 1, -1 do x = x * B + a[i] end
  return x
end

local function mod(a, b) -- a % b, by long division with estimated quotient limbs
  if cmp(a, b) < 0 then return a end
  local r, bd = { 0 }, approx(b)
  for i = #a, 1, -1 do
    table.insert(r, 1, a[i]) -- r = r * B + a[i]
    strip(r)
    if cmp(r, b) >= 0 then
      -- r < b * B, so the quotient limb is below B; the estimate is off by at most one
      -- either way, so start one below it and step up.
      local q = math.max(math.floor(approx(r) / bd) - 1, 0)
      if q > 0 then r = sub(r, mul(b, { q })) end
      while cmp(r, b) >= 0 do r = sub(r, b) end
    end
  end
  return r
end

local function server_now()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2])) .. '000'
end

if redis.replicate_commands then redis.replicate_commands() end -- (Redis < 5: TIME, then writes)

local function refund()
  local algorithm = ARGV[2]
  local done = 0
  for i = 1, #KEYS do
    local a = 3 + (i - 1) * 3
    local cost, charged, later = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
    local key = KEYS[i]
    local raw = redis.call('HMGET', key, 't', 'u', 'p', 'a')
    local t = raw[1]
    if t and raw[4] == algorithm then
      if algorithm == 'gcra' then
        local st, span = parse(t), parse(charged)
        redis.call('HSET', key, 't', cmp(st, span) >= 0 and str(sub(st, span)) or '0')
      elseif t == charged then
        redis.call('HSET', key, 'u', math.max((tonumber(raw[2]) or 0) - cost, 0))
      elseif t == later and algorithm == 'sliding_window' then
        redis.call('HSET', key, 'p', math.max((tonumber(raw[3]) or 0) - cost, 0))
      end
      redis.call('HINCRBY', key, 'ok', -cost)
      redis.call('HINCRBY', key, 'no', cost)
      done = done + 1
    end
  end
  return done
end

if ARGV[1] == 'refund' then return refund() end

local algorithm = ARGV[1]
local now_s = ARGV[2]
if now_s == '' then now_s = server_now() end
local now = parse(now_s)
local n = #KEYS / 2

local found, new, admitted = {}, {}, true
local out = { 0, now_s }
for i = 1, n do
  local a = 3 + (i - 1) * 5
  local cost, cap = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local span = parse(ARGV[a + 2])
  local raw = redis.call('HMGET', KEYS[2 * i - 1], 't', 'u', 'p', 'a')
  local t, used, prev = raw[1], tonumber(raw[2]) or 0, tonumber(raw[3]) or 0
  if t and raw[4] ~= algorithm then t = false end -- another algorithm's state: none
  found[i] = raw[1] and true or false
  if t then
    out[#out + 1], out[#out + 2], out[#out + 3] = t, used, prev
  else
    out[#out + 1], out[#out + 2], out[#out + 3] = '', 0, 0
  end
  local ok, state
  if algorithm == 'gcra' then
    local tat = now
    if t then
      local st = parse(t)
      if cmp(st, now) > 0 then tat = st end
    end
    local after = add(tat, span) -- the new TAT
    ok = cost <= cap and cmp(after, add(now, parse(ARGV[a + 3]))) <= 0
    state = { after, 0, 0, after } -- t, used, prev, expiry
  else
    local period = span
    local st = sub(now, mod(now, period))
    local st_s = str(st)
    local count, before = 0, 0
    if t == st_s then
      count, before = used, prev
    elseif t and algorithm == 'sliding_window' and t == str(sub(st, period)) then
      before = used
    end
    if algorithm == 'fixed_window' then
      ok = cost <= cap and count + cost <= cap
      state = { st, count + cost, 0, add(st, period) }
    else
      local weighted = mul(parse(string.format('%d', before)), sub(period, sub(now, st)))
      local total = add(weighted, mul(parse(string.format('%d', count + cost)), period))
      ok = cost <= cap and cmp(total, mul(parse(string.format('%d', cap)), period)) <= 0
      state = { st, count + cost, before, add(st, add(period, period)) }
    end
  end
  new[i] = state
  if not ok then admitted = false end
end

for i = 1, n do
  local a = 3 + (i - 1) * 5
  local cost = tonumber(ARGV[a])
  local key = KEYS[2 * i - 1]
  if cost > 0 then
    if admitted then
      local state = new[i]
      local ms = math.floor(approx(sub(state[4], now)) / 1000000) + 2 -- (never early)
      redis.call('HSET', key, 't', str(state[1]), 'u', state[2], 'p', state[3],
        'a', algorithm, 'm', ARGV[a + 4])
      redis.call('HINCRBY', key, 'ok', cost)
      redis.call('PEXPIRE', key, ms)
      local index = KEYS[2 * i]
      redis.call('SADD', index, key)
      if redis.call('PTTL', index) < ms then redis.call('PEXPIRE', index, ms) end
    elseif found[i] then
      redis.call('HINCRBY', key, 'no', cost)
    end
  end
end

if admitted then out[1] = 1 end
return out

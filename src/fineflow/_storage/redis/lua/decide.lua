-- fineflow: decide the quotas of requests, each all or nothing (one script call, atomic).
--
-- The same arithmetic as the reference functions in fineflow/_ratelimit/algorithms.py, on
-- exact integers: Lua's numbers are doubles, exact only below 2^53, and nanoseconds since
-- the epoch (about 1.7e18) are past that. GCRA (the default, and the hot path) only adds and
-- compares times: it keeps each as two numbers, whole seconds and nanoseconds. The window
-- algorithms need remainders and products: they use the small bignum helpers below.
--
-- Layout: one hash per limited key (KEYS), one field per (endpoint, policy) of that key,
-- its value "<algorithm> <t> <used> <prev> <allowed> <denied> <meta>": the BucketState,
-- the allowed and denied cost (for status and stats), then what status() needs to rebuild
-- the quota (written as the client sends it). The field "~x" holds the latest time at which
-- a state of the hash ends (ns); the hash expires then (PEXPIRE), each state being
-- equivalent to no state from its own end on.
--
-- Decide several requests, one after the other, each all or nothing: per request, ARGV
-- holds its algorithm ("gcra", "fixed_window" or "sliding_window"), now in nanoseconds
-- since the epoch or "" for the server's TIME (read once per call), its number of quotas,
-- then per quota 4 values:
--   the index of its hash in KEYS, its field,
--   "<cost> <cap> <span> <tau>": cost (clamped to capacity + 1 by the client, so it fits a
--   double); cap (gcra: the capacity; windows: the limit); span (gcra: cost * T; windows:
--   the period in ns); tau (gcra: the tolerance in ns; windows: the period in whole
--   seconds when it is some, else 0),
--   meta.
-- Returns one string, a line per request: "<admitted: 1 or 0> <now>" then per quota the
-- state it found, " <t> <used> <prev>" (t "-" for none); the client computes the decisions
-- from these with the reference functions. (One string: a client parses it much faster
-- than an array; one call for many requests: the server runs this chunk, and the client
-- writes and reads a command, once per batch instead of once per request.)
--
-- Refund: ARGV[1] is "refund", ARGV[2] the algorithm, then per quota 5 values: the index of
-- its hash, its field, cost, then gcra: cost * T and ""; windows: the window start charged
-- and the next window's start (where the charge has become the previous window's count).
-- Gives back what a decision charged (Redis Cluster: the quotas of a request on several
-- slots are charged slot by slot, and refunded when one denies). Returns how many states
-- it refunded.

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

local STATE = '^(%S+) (%d+) (%d+) (%d+) (%-?%d+) (%d+) '
local G = 1000000000
local EXACT = 9007199254740992 -- 2^53: doubles hold every integer below

local function split(s) -- a decimal string -> (whole seconds, nanoseconds)
  local n = #s
  if n <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end

local function join(h, l)
  if h == 0 then return string.format('%d', l) end
  return string.format('%d%09d', h, l)
end

local function plus(ah, al, bh, bl)
  local h, l = ah + bh, al + bl
  if l >= G then return h + 1, l - G end
  return h, l
end

local function before(ah, al, bh, bl) -- a < b
  return ah < bh or (ah == bh and al < bl)
end

local function longer(a, b) -- decimal strings: a > b
  if #a ~= #b then return #a > #b end
  return a > b
end


local function refund()
  local algorithm = ARGV[2]
  local done = 0
  for a = 3, #ARGV, 5 do
    local key, field = KEYS[tonumber(ARGV[a])], ARGV[a + 1]
    local cost, charged, later = tonumber(ARGV[a + 2]), ARGV[a + 3], ARGV[a + 4]
    local value = redis.call('HGET', key, field)
    if value then
      local _, stop, alg, t, used, prev, ok, no = string.find(value, STATE)
      if alg == algorithm then
        used, prev = tonumber(used), tonumber(prev)
        if algorithm == 'gcra' then
          local st, span = parse(t), parse(charged)
          t = cmp(st, span) >= 0 and str(sub(st, span)) or '0'
        elseif t == charged then
          used = math.max(used - cost, 0)
        elseif t == later and algorithm == 'sliding_window' then
          prev = math.max(prev - cost, 0)
        end
        -- (.. rather than %s: string.format would cut the meta at its first NUL)
        redis.call('HSET', key, field, alg .. ' ' .. t .. string.format(' %d %d %d %d ', used,
          prev, tonumber(ok) - cost, tonumber(no) + cost) .. string.sub(value, stop + 1))
        done = done + 1
      end
    end
  end
  return done
end

if ARGV[1] == 'refund' then return refund() end

local clock -- the server's TIME, read once per call: {seconds, nanoseconds, string}

local function decide(algorithm, now_s, first, last)
  local nh, nl
  -- An explicit now (tests, replays) runs on a timeline of its own, while the hash expires
  -- on the server's: keep it a minute longer then, so real time spent between two calls
  -- never expires a state early on that timeline (a state past its end is no state anyway,
  -- so a longer life changes no decision).
  local grace = 2
  if now_s ~= '' then grace = 60000 end
  if now_s == '' then
    if not clock then
      if redis.replicate_commands then redis.replicate_commands() end -- (Redis < 5)
      local time = redis.call('TIME')
      local h, l = tonumber(time[1]), tonumber(time[2]) * 1000
      clock = { h, l, join(h, l) }
    end
    nh, nl, now_s = clock[1], clock[2], clock[3]
  else
    nh, nl = split(now_s)
  end
  local now -- as a bignum, when a window algorithm needs it

  local quotas, hashes, admitted = {}, {}, true
  local out = { '0', now_s }

  for a = first, last, 4 do
    local k = tonumber(ARGV[a])
    local cost, cap, span_s, tau_s = string.match(ARGV[a + 2], '^(%d+) (%d+) (%d+) (%d+)$')
    cost, cap = tonumber(cost), tonumber(cap)
    local raw = redis.call('HMGET', KEYS[k], ARGV[a + 1], '~x')
    if not hashes[k] then hashes[k] = { ends = raw[2] or '', fields = {} } end
    local alg, t, used, prev, ok, no
    if raw[1] then alg, t, used, prev, ok, no = string.match(raw[1], STATE) end
    local found = alg == algorithm
    used, prev = found and tonumber(used) or 0, found and tonumber(prev) or 0
    out[#out + 1] = found and (t .. string.format(' %d %d', used, prev)) or '- 0 0'
    local allowed, state
    if algorithm == 'gcra' then
      local th, tl = nh, nl -- the TAT: max(t, now)
      if found then
        local sh, sl = split(t)
        if before(th, tl, sh, sl) then th, tl = sh, sl end
      end
      local sh, sl = split(span_s)
      local ah, al = plus(th, tl, sh, sl) -- the new TAT
      local uh, ul = plus(nh, nl, split(tau_s)) -- now + tau
      allowed = cost <= cap and not before(uh, ul, ah, al)
      local after = join(ah, al)
      -- t, used, prev, end (a string), milliseconds to the end (a double: the TTL only)
      state = { after, 0, 0, after, ((ah - nh) * G + (al - nl)) / 1000000 }
    else
      -- A period of whole seconds (tau carries it, else 0: the usual case) needs no
      -- bignum: the window's start is whole seconds, and for the sliding window the
      -- products stay exact in doubles unless the limit is huge.
      local whole = tonumber(tau_s)
      local sliding = algorithm == 'sliding_window'
      local sh, st_s, before_s, ends_s, ms, period, st
      if whole > 0 then
        sh = nh - nh % whole
        st_s, before_s = join(sh, 0), join(sh - whole, 0)
        local span = sliding and 2 * whole or whole
        ends_s = join(sh + span, 0)
        ms = ((sh + span - nh) * G - nl) / 1000000
      else
        now = now or parse(now_s)
        period = parse(span_s)
        st = sub(now, mod(now, period))
        st_s = str(st)
        before_s = cmp(st, period) >= 0 and str(sub(st, period))
        local ends = add(st, sliding and add(period, period) or period)
        ends_s = str(ends)
        ms = approx(sub(ends, now)) / 1000000
      end
      local count, prev_count = 0, 0
      if found and t == st_s then
        count, prev_count = used, prev
      elseif found and sliding and t == before_s then
        prev_count = used
      end
      if not sliding then
        allowed = cost <= cap and count + cost <= cap
      elseif whole > 0 and (3 * cap + 2) * whole * G < EXACT then
        local p = whole * G
        local rest = (whole - (nh - sh)) * G - nl -- the period minus the time elapsed
        allowed = cost <= cap and prev_count * rest + (count + cost) * p <= cap * p
      else
        now = now or parse(now_s)
        period = period or parse(span_s)
        st = st or parse(st_s)
        local weighted = mul(parse(string.format('%d', prev_count)), sub(period, sub(now, st)))
        local total = add(weighted, mul(parse(string.format('%d', count + cost)), period))
        allowed = cost <= cap and cmp(total, mul(parse(string.format('%d', cap)), period)) <= 0
      end
      state = { st_s, count + cost, sliding and prev_count or 0, ends_s, ms }
    end
    if not allowed then admitted = false end
    quotas[#quotas + 1] = { k = k, field = ARGV[a + 1], cost = cost, meta = ARGV[a + 3],
      state = state, raw = raw[1], ok = tonumber(ok) or 0, no = tonumber(no) or 0 }
  end

  for _, q in ipairs(quotas) do
    if q.cost > 0 then
      local hash = hashes[q.k]
      local fields = hash.fields
      if admitted then
        local st = q.state
        fields[#fields + 1] = q.field
        fields[#fields + 1] = algorithm .. ' ' .. st[1] .. string.format(' %d %d %d %d ',
          st[2], st[3], q.ok + q.cost, q.no) .. q.meta
        if longer(st[4], hash.ends) then hash.ends, hash.ms = st[4], st[5] end
      elseif q.raw then -- denied: counted on the state there is (of any algorithm)
        local alg, t, used, prev, ok, no = string.match(q.raw, STATE)
        fields[#fields + 1] = q.field
        fields[#fields + 1] = alg .. ' ' .. t .. ' ' .. used .. ' ' .. prev .. ' ' .. ok .. ' '
          .. string.format('%d ', tonumber(no) + q.cost) .. q.meta
      end
    end
  end

  for k, hash in pairs(hashes) do
    local fields = hash.fields
    if hash.ms then
      fields[#fields + 1] = '~x'
      fields[#fields + 1] = hash.ends
    end
    if #fields > 0 then redis.call('HSET', KEYS[k], unpack(fields)) end
    if hash.ms then -- (never early: the milliseconds rounded down, plus the grace)
      redis.call('PEXPIRE', KEYS[k], math.floor(hash.ms) + grace)
    end
  end

  if admitted then out[1] = '1' end
  return table.concat(out, ' ')
end

local replies, a = {}, 1
while a <= #ARGV do
  local count = tonumber(ARGV[a + 2])
  replies[#replies + 1] = decide(ARGV[a], ARGV[a + 1], a + 3, a + 2 + 4 * count)
  a = a + 3 + 4 * count
end
return table.concat(replies, '\n')

-- take_rate_tokens: a rate limit shared by every API process (GCRA, the
-- generic cell rate algorithm). The bucket is one number, its theoretical
-- arrival time (TAT): when it would be empty again if nothing more came.
-- Up to `want` tokens are granted at once, so that a process can lease a few
-- and spend them without a round trip each (src/access/rate_limit.rs).
-- Times are Redis's own clock (TIME), so API processes whose clocks differ
-- still share one bucket fairly.
--
-- KEYS[1] the bucket (string: TAT in microseconds), expiring once full again
-- ARGV[1] microseconds per token (1e6 / rate per second), at least 1
-- ARGV[2] burst: tokens a quiet bucket holds, at least 1
-- ARGV[3] tokens wanted, at least 1
--
-- Returns {granted, retry_after_us}: granted > 0 and retry_after_us 0, or
-- granted 0 and how long until one token is free.

local interval, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not interval or interval < 1 or not burst or burst < 1 or not want or want < 1 then
  return redis.error_reply('take_rate_tokens: bad arguments')
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then
  tat = now
end
-- A full bucket has TAT = now; each token taken moves it one interval on.
local available = math.floor((now + burst * interval - tat) / interval)
local granted = math.min(want, available)
if granted < 1 then
  return {0, tat + interval - burst * interval - now}
end
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {granted, 0}

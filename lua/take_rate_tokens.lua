-- take_rate_tokens: a rate limit shared by every API process (GCRA, see
-- gcra_take in lib.lua), for holders that are not keys: client addresses'
-- failed authentications. Keys take theirs in authenticate_key.lua.
--
-- KEYS[1] the bucket (string: TAT in microseconds), expiring once full again
-- ARGV[1] microseconds per token (1e6 / rate per second), at least 1
-- ARGV[2] burst: tokens a quiet bucket holds, at least 1
-- ARGV[3] tokens wanted, at least 1 (at most a quarter of the burst is granted)
--
-- Returns {granted, retry_after_us}: granted > 0 and retry_after_us 0, or
-- granted 0 and how long until one token is free.

local interval, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not interval or interval < 1 or not burst or burst < 1 or not want or want < 1 then
  return redis.error_reply('take_rate_tokens: bad arguments')
end
local granted, retry_after = gcra_take(KEYS[1], interval, burst, want, redis_now_us())
return {granted, retry_after}

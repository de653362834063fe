-- retry_batch: an exchange call failed in a way worth retrying. Schedule the
-- next attempt and acknowledge this one, in one atomic step, so the job is
-- always in exactly one place: the stream or the retry schedule.
--
-- KEYS[1] the batch (hash)        KEYS[2] settle jobs (stream)
-- KEYS[3] retry schedule (sorted set: job JSON by due time, ms)
-- ARGV[1] consumer group          ARGV[2] settle job's stream id
-- ARGV[3] due time, ms since the Unix epoch
-- ARGV[4] the next job, as JSON   ARGV[5] why this attempt failed
-- ARGV[6] "1" if the call got no answer, so the exchange may have filled it
--
-- Returns {"scheduled"} | {"skipped", status} when the batch is no longer
-- settling (another delivery finished it); the job is acknowledged either way.

local status = redis.call('HGET', KEYS[1], 'status')
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if status ~= 'settling' then
  return {'skipped', status or 'missing'}
end
redis.call('HSET', KEYS[1], 'last_error', ARGV[5])
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'fill_unknown', 1) -- until settled: see refund_batch
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return {'scheduled'}

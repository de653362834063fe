-- begin_attempt: a worker is about to call the exchange for a batch. Count
-- the attempt if the batch is still settling; otherwise acknowledge the job,
-- which another delivery already ended.
--
-- KEYS[1] the batch (hash)   KEYS[2] settle jobs (stream)
-- ARGV[1] consumer group     ARGV[2] settle job's stream id
--
-- Returns {"go", attempts} | {"skipped", status} (the job is acknowledged).

local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'settling' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return {'skipped', status or 'missing'}
end
return {'go', tostring(redis.call('HINCRBY', KEYS[1], 'attempts', 1))}

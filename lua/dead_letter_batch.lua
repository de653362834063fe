-- dead_letter_batch: a batch could not be bought (attempts exhausted, or the
-- exchange rejected it). Mark it failed, copy the job to the dead-letter
-- stream, emit the accounting event and acknowledge, in one atomic step. The
-- customers' money stays with @exchange until an operator retries or refunds.
--
-- KEYS[1] the batch (hash)           KEYS[2] settle jobs (stream)
-- KEYS[3] dead letters (stream)      KEYS[4] failed batches (sorted set)
-- KEYS[5] accounting events (stream)
-- ARGV[1] consumer group   ARGV[2] settle job's stream id   ARGV[3] batch id
-- ARGV[4] the last error   ARGV[5] attempts made            ARGV[6] now, ms
-- ARGV[7] worker name
-- ARGV[8] "1" if the last call got no answer, so the exchange may have filled it
--
-- Returns {"failed"} | {"skipped", status} when the batch is no longer settling.
--
-- Safe to run twice: the same call run again (the batch failed at this
-- moment, with this error) answers "failed" as it did, writing nothing.

local current = redis.call('HMGET', KEYS[1], 'status', 'failed_at', 'last_error')
local status = current[1]
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if current[2] == ARGV[6] and current[3] == ARGV[4] then
  return {'failed'}
end
if status ~= 'settling' then
  return {'skipped', status or 'missing'}
end
local batch_id, now = ARGV[3], ARGV[6]
local batch = redis.call('HMGET', KEYS[1], 'symbol', 'quantity', 'value')
redis.call('HSET', KEYS[1], 'status', 'failed', 'last_error', ARGV[4], 'failed_at', now)
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[1], 'fill_unknown', 1) -- see refund_batch
end
redis.call('ZADD', KEYS[4], now, batch_id)
redis.call('XADD', KEYS[3], '*', 'batch_id', batch_id, 'symbol', batch[1],
  'quantity_units', batch[2], 'value_cents', batch[3], 'attempts', ARGV[5],
  'error', ARGV[4], 'failed_at', now, 'worker', ARGV[7])
redis.call('XADD', KEYS[5], '*', 'type', 'batch.failed',
  'ref', batch_id, 'amount', batch[3], 'at', now, 'reason', ARGV[4], 'worker', ARGV[7])
return {'failed'}

-- requeue_failed_batch: an operator sends a failed batch back to the
-- exchange. It becomes settling again with a fresh settle job (attempt 1),
-- and its count of calls starts again: the workers decide retry or
-- dead-letter from that count, so the replay gets attempts_max calls anew
-- (the dead-letter stream keeps the earlier rounds).
--
-- KEYS[1] the batch (hash)   KEYS[2] settle jobs (stream)
-- KEYS[3] failed batches (sorted set)
-- ARGV[1] batch id           ARGV[2] now, ms since the Unix epoch
--
-- Returns {"queued"} | {"refused", "not_failed", status}
--
-- Safe to run twice: the same call run again (requeued at this moment)
-- answers "queued" as it did, writing nothing, whatever the batch did since.

local current = redis.call('HMGET', KEYS[1], 'status', 'requeued_at')
local status = current[1]
if current[2] == ARGV[2] then
  return {'queued'}
end
if status ~= 'failed' then
  return {'refused', 'not_failed', status or 'missing'}
end
local batch = redis.call('HMGET', KEYS[1], 'symbol', 'quantity', 'value', 'order_count')
local quantity = tonumber(batch[2])
local quantity_text = string.format('%d.%08d', math.floor(quantity / 1e8), quantity % 1e8)
redis.call('HSET', KEYS[1], 'status', 'settling', 'requeued_at', ARGV[2], 'attempts', 0)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'batch_id', ARGV[1], 'symbol', batch[1],
  'quantity', quantity_text, 'quantity_units', batch[2], 'value_cents', batch[3],
  'order_count', batch[4], 'attempt', 1, 'created_at', ARGV[2])
return {'queued'}

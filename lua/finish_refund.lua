-- finish_refund: the last step of a refund saga, on the batch's home shard,
-- once every order is refunded on its customer's shard: the batch becomes
-- refunded, its intent goes, and the accounting event is written, as
-- refund_batch.lua writes it for a one-step refund.
--
-- KEYS[1] the batch (hash)   KEYS[2] accounting events (stream)
-- KEYS[3] refund intents (sorted set)
-- ARGV[1] batch id   ARGV[2] now, ms
--
-- Returns {"refunded", order_count, value} | {"refused", "not_refunding", status}

local current = redis.call('HMGET', KEYS[1], 'status', 'value', 'order_count')
local status = current[1]
if status == 'refunded' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'refunded', current[3], current[2]}
end
if status ~= 'refunding' then
  return {'refused', 'not_refunding', status or 'missing'}
end
redis.call('HSET', KEYS[1], 'status', 'refunded', 'refunded_at', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'type', 'batch.refunded',
  'ref', ARGV[1], 'amount', current[2], 'at', ARGV[2])
return {'refunded', current[3], current[2]}

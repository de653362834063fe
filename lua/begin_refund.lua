-- begin_refund: the first step of a refund saga (CLUSTER.md: a refund is the
-- order saga in reverse), on the batch's home shard, where one script cannot
-- reach every customer's shard (a cluster): the failed batch becomes
-- `refunding`, leaves the failed set, and gets an intent, so that a sweeper
-- finishes the refund after a crash. Each order is then refunded on its
-- customer's shard (refund_orders.lua), and finish_refund.lua marks the
-- batch refunded. The only step that can refuse.
--
-- KEYS[1] the batch (hash)   KEYS[2] failed batches (sorted set)
-- KEYS[3] refund intents (sorted set: batch id by takeover time, ms)
-- ARGV[1] batch id   ARGV[2] now, ms   ARGV[3] operator's note
-- ARGV[4] "1" if the operator confirms the exchange did not fill the batch
-- ARGV[5] when a sweeper may take the refund over, ms
--
-- Returns {"refunding", refund_at} (begun now, or earlier and not yet
-- finished: the caller goes on with that refund)
--   | {"refunded", refund_at} (finished by this same call, sent again)
--   | {"refused", "not_failed", status} | {"refused", "fill_unknown"}

local current = redis.call('HMGET', KEYS[1], 'status', 'refunded_at', 'fill_unknown')
local status = current[1]
-- Refunding: a crash stopped a refund half way, and this call goes on with
-- it. Refunded by this very call (a resent call): as it answered.
if status == 'refunding' or (status == 'refunded' and current[2] == ARGV[2]) then
  return {status, current[2]}
end
if status ~= 'failed' then
  return {'refused', 'not_failed', status or 'missing'}
end
if current[3] == '1' and ARGV[4] ~= '1' then
  return {'refused', 'fill_unknown'}
end
redis.call('HSET', KEYS[1], 'status', 'refunding', 'refunded_at', ARGV[2],
  'refund_note', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return {'refunding', ARGV[2]}

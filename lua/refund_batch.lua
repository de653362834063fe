-- refund_batch: an operator gives up on a failed batch. Every order's cost
-- goes back from @exchange to its customer, journaled one entry per order,
-- and the batch becomes refunded, in one atomic step.
--
-- The caller passes each order's key and its customer's account key; the
-- script checks them against the batch before it writes anything.
--
-- KEYS[1] the batch (hash)          KEYS[2] the batch's order ids (list)
-- KEYS[3] @exchange account (hash)  KEYS[4] journal (stream)
-- KEYS[5] failed batches (sorted set)  KEYS[6] accounting events (stream)
-- KEYS[7] journal index (sorted set of padded entry ids, for the report)
-- KEYS[8], KEYS[9], ...: for each order of the batch, in batch order, the
--   order (hash) and its customer's account (hash)
-- ARGV[1] batch id   ARGV[2] now, ms   ARGV[3] @exchange's account id
-- ARGV[4] operator's note
-- ARGV[5], ARGV[6], ...: for each order, its customer's account id
--
-- Returns {"refunded", order_count, value} | {"refused", "not_failed", status}
--   | {"refused", "stale_orders"} when the keys passed are not the batch's.

local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'failed' then
  return {'refused', 'not_failed', status or 'missing'}
end
local order_ids = redis.call('LRANGE', KEYS[2], 0, -1)
if #KEYS ~= 7 + 2 * #order_ids or #ARGV ~= 4 + #order_ids then
  return {'refused', 'stale_orders'}
end
local costs, total = {}, 0
for i, order_id in ipairs(order_ids) do
  local order = redis.call('HMGET', KEYS[6 + 2 * i], 'id', 'account_id', 'cost')
  if order[1] ~= order_id or order[2] ~= ARGV[4 + i] then
    return {'refused', 'stale_orders'}
  end
  costs[i] = order[3]
  total = total + tonumber(order[3])
end
local value = redis.call('HGET', KEYS[1], 'value')
if total ~= tonumber(value) then
  return {'refused', 'stale_orders'}
end

local batch_id, now = ARGV[1], ARGV[2]
for i, order_id in ipairs(order_ids) do
  redis.call('HINCRBY', KEYS[7 + 2 * i], 'balance', costs[i])
  redis.call('HINCRBY', KEYS[3], 'balance', '-' .. costs[i])
  journal(KEYS[4], KEYS[7], 'at', now, 'kind', 'refund', 'debit', ARGV[3],
    'credit', ARGV[4 + i], 'amount', costs[i], 'ref', order_id, 'status', 'completed',
    'reason', 'batch ' .. batch_id .. ' refunded')
end
redis.call('HSET', KEYS[1], 'status', 'refunded', 'refunded_at', now, 'refund_note', ARGV[4])
redis.call('ZREM', KEYS[5], batch_id)
redis.call('XADD', KEYS[6], '*', 'type', 'batch.refunded',
  'ref', batch_id, 'amount', value, 'at', now)
return {'refunded', tostring(#order_ids), value}

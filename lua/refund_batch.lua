-- refund_batch: an operator gives up on a failed batch. Every order's cost
-- goes back from @exchange to its customer, journaled one entry per order,
-- and the batch becomes refunded, in one atomic step.
--
-- A call that got no answer may have been filled (`fill_unknown` on the
-- batch): refunding then would pay the customers back for coins the house
-- bought. Such a batch is refunded only when the operator confirms the
-- exchange did not fill it; a retry is the safe way to find out, since the
-- exchange fills each batch id once.
--
-- The caller passes each order's key and its customer's account key; the
-- script checks them against the batch before it writes anything.
--
-- KEYS[1] the batch (hash)          KEYS[2] the batch's order ids (list)
-- KEYS[3] @exchange account (hash)  KEYS[4] journal (stream)
-- KEYS[5] failed batches (sorted set)  KEYS[6] accounting events (stream)
-- KEYS[7] journal index (sorted set of padded entry ids, for the report)
-- KEYS[8], KEYS[9], ...: for each order of the batch, in batch order, the
--   order (hash), its customer's account (hash) and the customer's journal
--   entries (stream)
-- ARGV[1] batch id   ARGV[2] now, ms   ARGV[3] @exchange's account id
-- ARGV[4] operator's note
-- ARGV[5] "1" if the operator confirms the exchange did not fill the batch
-- ARGV[6], ARGV[7], ...: for each order, its customer's account id
--
-- Returns {"refunded", order_count, value} | {"refused", "not_failed", status}
--   | {"refused", "stale_orders"} when the keys passed are not the batch's
--   | {"refused", "fill_unknown"} when it may be filled and that is not confirmed
--   | {"refused", "balance_limit", account_id} when a refund would take that
--     account (a customer, or @exchange) past BALANCE_LIMIT; nothing is
--     refunded.
--
-- Safe to run twice: the same call run again (refunded at this moment) answers
-- "refunded" as it did, writing nothing.

local current = redis.call('HMGET', KEYS[1], 'status', 'refunded_at', 'value')
local status = current[1]
if status == 'refunded' and current[2] == ARGV[2] then
  return {'refunded', tostring(redis.call('LLEN', KEYS[2])), current[3]}
end
if status ~= 'failed' then
  return {'refused', 'not_failed', status or 'missing'}
end
if redis.call('HGET', KEYS[1], 'fill_unknown') == '1' and ARGV[5] ~= '1' then
  return {'refused', 'fill_unknown'}
end
local order_ids = redis.call('LRANGE', KEYS[2], 0, -1)
if #KEYS ~= 7 + 3 * #order_ids or #ARGV ~= 5 + #order_ids then
  return {'refused', 'stale_orders'}
end
local costs, total = {}, 0
for i, order_id in ipairs(order_ids) do
  local order = redis.call('HMGET', KEYS[5 + 3 * i], 'id', 'account_id', 'cost')
  if order[1] ~= order_id or order[2] ~= ARGV[5 + i] then
    return {'refused', 'stale_orders'}
  end
  costs[i] = order[3]
  total = total + tonumber(order[3])
end
local value = redis.call('HGET', KEYS[1], 'value')
if total ~= tonumber(value) then
  return {'refused', 'stale_orders'}
end

-- Every refund, both sides, before the first write, counting what the
-- refunds before it moved (a customer may have several orders in the batch).
-- The batch is refunded whole or not at all.
local exchange_after = tonumber(redis.call('HGET', KEYS[3], 'balance') or '0')
local customers_after = {} -- account key -> balance after the refunds so far
for i, cost in ipairs(costs) do
  local amount = tonumber(cost)
  exchange_after = exchange_after - amount
  if not within_limit(exchange_after) then
    return {'refused', 'balance_limit', ARGV[3]}
  end
  local key = KEYS[6 + 3 * i]
  local after = (customers_after[key] or tonumber(redis.call('HGET', key, 'balance') or '0')) + amount
  if not within_limit(after) then
    return {'refused', 'balance_limit', ARGV[5 + i]}
  end
  customers_after[key] = after
end

local batch_id, now = ARGV[1], ARGV[2]
for i, order_id in ipairs(order_ids) do
  redis.call('HINCRBY', KEYS[6 + 3 * i], 'balance', costs[i])
  redis.call('HINCRBY', KEYS[3], 'balance', '-' .. costs[i])
  local entry = journal(KEYS[4], KEYS[7], 'at', now, 'kind', 'refund', 'debit', ARGV[3],
    'credit', ARGV[5 + i], 'amount', costs[i], 'ref', order_id, 'status', 'completed',
    'reason', 'batch ' .. batch_id .. ' refunded')
  index_on_accounts(KEYS[4], entry, KEYS[7 + 3 * i])
end
redis.call('HSET', KEYS[1], 'status', 'refunded', 'refunded_at', now, 'refund_note', ARGV[4])
redis.call('ZREM', KEYS[5], batch_id)
redis.call('XADD', KEYS[6], '*', 'type', 'batch.refunded',
  'ref', batch_id, 'amount', value, 'at', now)
return {'refunded', tostring(#order_ids), value}
